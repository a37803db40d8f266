"""``Engine``: what the session core asks of a training loop; adapters implement it.

Hooks never see an engine: they see a :class:`~lightning_finalops.RawSession` that the core
builds over it. So an engine's verbs (writing checkpoints, agreeing across ranks) are the
core's to call, and a hook reaches them only through the raw session's documented methods.

An engine for another loop (Ignite, TorchTNT, a hand-written trainer) subclasses
:class:`Engine`, implements :attr:`~Engine.global_step`, overrides the verbs whose defaults
(one process, no named values, no loggers, no checkpoints) do not fit, and drives a
:class:`~lightning_finalops.HookedSession` from its loop's events.
"""

from __future__ import annotations

import abc
import types
from concurrent.futures import Future
from typing import Any, Mapping, Optional, Tuple

from lightning_finalops.distributed import RankAgreement

__all__ = [
    "EMPTY",
    "Engine",
    "completed_future",
]

EMPTY: Mapping[Any, Any] = types.MappingProxyType({})


def completed_future() -> Future:
    """A future that is already done: a write that happened at once (or not on this rank)."""
    future: Future = Future()
    future.set_result(None)
    return future


class Engine(abc.ABC):
    """The verbs the session core asks of a training loop.

    Attributes:
        str_feeds_as_keywords: whether the engine passes str feeds as keyword arguments to
            the callables of the run (each must then be accepted by one of them), rather
            than by other means (Lightning sets them on the batch).
        hook_attributes: names of the engine's attributes that hooks may read on their raw
            session, beyond the contract (``("trainer", "pl_module", "modules")`` under Lightning,
            ``("modules", "fabric")`` in a plain loop). Read live at each access.
        step_final_after_run: whether nothing more is recorded at a run's global step once
            its ``after_run`` s ran, so a checkpoint asked for in the run is written then
            (read at that point; a plain loop: always). ``False``: the engine calls
            :meth:`HookedSession.flush_checkpoint` where the step becomes final (Lightning:
            at the end of the validation that follows the batch); the next run's start and
            the session's end write it at the latest.
    """

    str_feeds_as_keywords: bool = True
    hook_attributes: Tuple[str, ...] = ()
    step_final_after_run: bool = True

    @property
    @abc.abstractmethod
    def global_step(self) -> int:
        """The number of completed training steps."""

    @property
    def is_chief(self) -> bool:
        """Whether this process writes shared files (global rank 0). Default: True."""
        return True

    def named_values(self) -> Mapping[str, Any]:
        """Values the engine names beyond the step's outputs (``callback_metrics``).

        Read only when a name is not among the fresh step outputs. Default: none.
        """
        return EMPTY

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: B027
        """Send scalars to the engine's loggers. Default: no loggers, nothing sent."""

    def write_checkpoint(self, path: str) -> None:
        """Write a checkpoint that resumes the whole run to ``path``, atomically.

        Every rank calls it; what each writes is the engine's business.

        Raises:
            NotImplementedError: the engine cannot write checkpoints (the default).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write checkpoints.")

    def write_checkpoint_async(self, path: str) -> Future:
        """Start writing a checkpoint to ``path`` in the background; a future of its end.

        The state is copied before this returns (the loop may change it at once); the file
        or directory appears under ``path`` only once complete. Every rank calls it. The
        default writes at once (:meth:`write_checkpoint`, whose errors are raised here)
        and returns a completed future.
        """
        self.write_checkpoint(path)
        return completed_future()

    def checkpointed_state(self) -> Any:
        """The state a checkpoint written now holds beyond modules and optimizers, or ``None``.

        The core compares it before and after a session's ``end()`` s to tell whether the
        last step's file, written before them, must be written again. Default ``None``: the
        session's hooks' state.
        """
        return None

    def rank_agreement(self, values: int, timeout: float,
                       name: str) -> Optional[RankAgreement]:
        """How the ranks of a training session agree; ``None``: one process (the default).

        Called once per session, at its creation, by every rank, when its hooks declare
        something to agree on. A distributed engine returns
        ``RankAgreement(values, timeout=timeout, name=name)``.

        Args:
            values: how many values the hooks declared.
            timeout: seconds any wait of the agreement may last.
            name: the session, as the agreement's errors name it.
        """
        return None

    def step_completed(self) -> None:  # noqa: B027
        """A run's step ran (its ``after_run`` s come next, unless a hook's fetch failed).

        Optional: the core calls it only when an engine overrides it (an engine that counts
        its global step by runs, as a plain loop does).
        """
