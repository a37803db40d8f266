"""The raw session hooks receive: the core's :class:`RawSession` over an engine.

It is the hooks' one door to the engine: the contract's verbs (``run``, ``global_step``,
``is_chief``, ``log_metrics``, ``save_checkpoint``), plus the engine attributes the engine
lists in :attr:`Engine.hook_attributes` (``trainer``, ``pl_module`` and ``modules`` under
Lightning, ``modules`` and ``fabric`` in a plain loop). Everything else the engine does (agreeing
across ranks, restoring) is the core's to ask, not a hook's.

Names resolve in one order, in hook fetches and in :meth:`run` alike: the outputs of the
step whose run is being finished (from the end of the step until the last ``after_run``),
then the engine's named values, then the outputs of the latest finished step. So a hook's
fetch ``"loss"`` is this step's loss, and a ``FinalOpsHook`` at the end of a Lightning
validation reads that validation's aggregated ``callback_metrics`` before the last batch's
outputs. The step's outputs are kept as the step returned them (nothing is copied per run);
a name lookup returns a detached copy.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from lightning_finalops.engine import EMPTY, Engine
from lightning_finalops.fetches import (
    LazyNamespace,
    Namespace,
    TensorFeeds,
    check_fetches,
    check_str_feeds_accepted,
    evaluate,
    split_feeds,
)
from lightning_finalops.session_run_hook import RawSession

logger = logging.getLogger("lightning_finalops")

__all__ = ["EngineRawSession"]


class EngineRawSession(RawSession):
    """The raw session of one session of hooks over ``engine``.

    Args:
        engine: the engine the session runs on.
        state_digest: a digest of what a checkpoint written now holds beyond modules and
            optimizers, taken at each write, to tell later whether it changed since.

    Attributes:
        saves_wait: ``with raw.saves_wait:`` while the core runs hooks: a checkpoint asked
            for meanwhile waits for :meth:`flush_checkpoint`.
    """

    def __init__(self, engine: Engine, state_digest: Callable[[], bytes]) -> None:
        self._engine = engine
        #: the latest step's outputs (a mapping, as the step returned it) and whether they
        #: belong to the run being finished; set by the session core only
        self.step_outputs: Mapping[str, Any] = EMPTY
        self.step_outputs_fresh = False
        # The checkpoints hooks asked for that wait until the step is final, {path:
        # (callback, only if changed)} in the order asked; whether the core runs hooks.
        self._due: Dict[str, Tuple[Optional[Callable[[], Optional[bool]]], bool, bool]] = {}
        #: the save in flight, ``(future, callback, path)``: at most one
        self.in_flight: Optional[Tuple[Future, Optional[Callable[[], Optional[bool]]], str]] = None
        self.deferring = False
        self.saves_wait = _Deferring(self)
        self._state_digest = state_digest
        # (global step, runs, state digest) at the latest write
        self._last_write: Optional[Tuple[int, int, bytes]] = None
        #: runs finished in this session (the core counts them)
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the class does not define: the engine's hook attributes.
        engine = self.__dict__.get("_engine")
        if engine is not None and name in engine.hook_attributes:
            return getattr(engine, name)
        raise AttributeError(
            f"The raw session has no attribute {name!r}"
            + (f" (on {type(engine).__name__}, hooks may read "
               f"{list(engine.hook_attributes)} besides the RawSession contract)."
               if engine is not None else ".")
        )

    @property
    def global_step(self) -> int:
        """The engine's global step."""
        return self._engine.global_step

    @property
    def is_chief(self) -> bool:
        """Whether this process is the chief (writes shared files)."""
        return self._engine.is_chief

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Send scalars to the engine's loggers."""
        self._engine.log_metrics(metrics, step)

    def save_checkpoint(
        self,
        path: str,
        on_written: Optional[Callable[[], Optional[bool]]] = None,
        *,
        only_if_changed: bool = False,
        asynchronous: bool = False,
    ) -> None:
        """Write a checkpoint of this step to ``path``, once the step is final.

        While the core runs hooks (``after_create_session``, ``after_run``, ``end``) the
        write waits for the core's next :meth:`flush_checkpoint`; elsewhere it happens now.
        A second request for a path that waits joins it: one write, both callbacks.

        Args:
            path: the checkpoint's path.
            on_written: called right after the write; for an asynchronous one, once it is
                committed, when the next save starts or the session ends (so at the same
                step on every rank, whenever each rank's write happened to end).
            only_if_changed: asked for in ``end()`` for the file of this step: write it
                again only if it was written with no run since and what it holds changed
                since (on any rank of a session whose ranks agree).
            asynchronous: copy the state now and write it in the background while the
                loop goes on (:meth:`Engine.write_checkpoint_async`); at most one save is
                in flight (the next one, the session's end and a failure wait for it).

        Raises:
            NotImplementedError: the engine cannot write checkpoints.
        """
        if not self.deferring:
            self._write(path, on_written, asynchronous)
        elif path in self._due:
            callback, conditional, background = self._due[path]
            self._due[path] = (_chained(callback, on_written), conditional and only_if_changed,
                               background and asynchronous)
        else:
            self._due[path] = (on_written, only_if_changed, asynchronous)

    @property
    def checkpoint_due(self) -> bool:
        """Whether a checkpoint waits for :meth:`flush_checkpoint`."""
        return bool(self._due)

    def flush_checkpoint(self, changed: bool = True) -> bool:
        """Write the checkpoints that wait, in the order asked; whether a callback asks to stop.

        Args:
            changed: :meth:`changed_since_current_step_written`, agreed across ranks: a
                request ``only_if_changed`` is dropped when it is False.
        """
        stop = False
        while self._due:
            path = next(iter(self._due))
            callback, only_if_changed, asynchronous = self._due.pop(path)
            if changed or not only_if_changed:
                stop = self._write(path, callback, asynchronous) or stop
        return stop

    def drop_checkpoint(self) -> List[str]:
        """Forget the checkpoints that wait (the session failed); return their paths.

        A save in flight is waited for (it commits only if it completes), without its
        callback.
        """
        dropped, self._due = list(self._due), {}
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            try:
                in_flight[0].result()
            except Exception as e:  # noqa: BLE001 - the session's own exception is raised
                logger.warning("The checkpoint save in flight to %s failed too: %r",
                               in_flight[2], e)
        return dropped

    def wait_for_save(self) -> bool:
        """Wait for the save in flight, then call its callback; whether that asks to stop.

        Raises:
            Exception: what the background write raised (nothing was committed).
        """
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is None:
            return False
        future, callback, _ = in_flight
        future.result()
        return bool(callback()) if callback is not None else False



    def changed_since_current_step_written(self) -> bool:
        """Whether this step's file, written with no run since, no longer holds the state.

        False also when the latest write was of another step, or runs came since (the
        loop moved on: the file keeps the position it was written at).
        """
        last = self._last_write
        return (last is not None and last[:2] == (self._engine.global_step, self.runs)
                and last[2] != self._state_digest())

    def _write(self, path: str, on_written: Optional[Callable[[], Optional[bool]]],
               asynchronous: bool = False) -> bool:
        stop = self.wait_for_save()  # at most one save in flight
        if asynchronous:
            future = self._engine.write_checkpoint_async(path)
            self._last_write = (self._engine.global_step, self.runs, self._state_digest())
            self.in_flight = (future, on_written, path)
            return stop
        self._engine.write_checkpoint(path)
        self._last_write = (self._engine.global_step, self.runs, self._state_digest())
        return bool(on_written() if on_written is not None else False) or stop

    def namespaces(self) -> Tuple[Namespace, ...]:
        """Where names resolve now, first match wins (see the module docstring)."""
        named = LazyNamespace(self._engine.named_values)
        if self.step_outputs_fresh:
            return (self.step_outputs, named)
        return (named, self.step_outputs)

    def run(self, fetches: Any, feed_dict: Optional[Mapping[Any, Any]] = None) -> Any:
        """Evaluate ``fetches`` now, without hooks, with ``feed_dict`` applied for this call.

        Returns:
            ``fetches`` evaluated: copies (tensors detached and cloned on their device).

        Raises:
            TypeError: an invalid fetch or feed key (the message names its position).
            KeyError: a name is in none of the namespaces (the message lists the names).
            ValueError: a str feed that no fetched callable accepts, or a tensor feed of
                the wrong shape.
        """
        check_fetches(fetches, "fetches")
        tensor_feeds, str_feeds = split_feeds(feed_dict, "feed_dict")
        check_str_feeds_accepted(str_feeds, fetches)
        feeds = TensorFeeds(tensor_feeds)
        try:
            feeds.apply()
            return evaluate(fetches, self.namespaces(), str_feeds)
        finally:
            feeds.restore()

    def forget_outputs(self) -> None:
        """Drop the reference to the latest step's outputs (the session ended)."""
        self.step_outputs = EMPTY
        self.step_outputs_fresh = False


class _Deferring:
    """``with raw.saves_wait:``: checkpoints asked for inside wait for the step to be final."""

    __slots__ = ("_raw",)

    def __init__(self, raw: EngineRawSession) -> None:
        self._raw = raw

    def __enter__(self) -> None:
        self._raw.deferring = True

    def __exit__(self, *exc_info: Any) -> None:
        self._raw.deferring = False


def _chained(first: Optional[Callable[[], Optional[bool]]],
             then: Optional[Callable[[], Optional[bool]]]) -> Optional[Callable[[], bool]]:
    """Both callbacks, in order, every one called; truthy if either is."""
    if first is None or then is None:
        return first or then  # type: ignore[return-value]

    def both() -> bool:
        a = first()
        b = then()
        return bool(a) or bool(b)

    return both
