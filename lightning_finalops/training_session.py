"""``MonitoredTrainingSession``: TF's factory of a session with the default training hooks."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from lightning_finalops.checkpoints import holds_sharded_tensors
from lightning_finalops.distributed import is_rank_zero, world_size
from lightning_finalops.hook_state import check_hooks, has_state
from lightning_finalops.hooks.checkpoint import CheckpointSaverHook
from lightning_finalops.hooks.stop import StopAtStepHook
from lightning_finalops.hooks.summary import StepCounterHook, SummarySaverHook
from lightning_finalops.monitored_session import MonitoredSession, check_fabric, named_objects
from lightning_finalops.session_run_hook import Agreement, SessionRunHook
from lightning_finalops.validation import check_bool, check_int, check_number, check_path

__all__ = ["MonitoredTrainingSession"]

PathType = Union[str, "os.PathLike[str]"]


class _UseDefault:
    """TF's ``USE_DEFAULT``: "not given", distinct from an explicit ``None``."""

    def __repr__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _UseDefault()


def _on(value: Any) -> Any:
    """The period if it is on (TF: given and greater than 0), else ``None``."""
    return value if value is not None and value > 0 else None


class _ChiefHookAgreement(SessionRunHook):
    """A worker's stand-in for a chief-only hook that declares an agreement.

    Every rank votes alike: the chief's hook posts, a worker's stand-in reserves its slots.
    """

    def __init__(self, agreement: Agreement) -> None:
        self._agreement = agreement

    def agreement(self) -> Agreement:
        return self._agreement


class _ChiefHookState(_ChiefHookAgreement):
    """A worker's stand-in for a stateful chief-only hook: it holds the hook's key.

    The chief's checkpoint has that hook's state under its key; the stand-in takes it on a
    worker and drops it, so a strict restore neither fails on it nor hands it elsewhere.
    """

    def __init__(self, state_key: str, agreement: Agreement) -> None:
        super().__init__(agreement)
        self._key = state_key

    @property
    def state_key(self) -> str:
        return self._key

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass  # the chief's hook state: a worker does not run that hook


def MonitoredTrainingSession(  # noqa: N802 - TF's name, kept so ported code reads the same
    *,
    is_chief: Optional[bool] = None,
    checkpoint_dir: Optional[PathType] = None,
    hooks: Optional[Sequence[SessionRunHook]] = None,
    chief_only_hooks: Optional[Sequence[SessionRunHook]] = None,
    modules: Any = None,
    optimizers: Any = None,
    save_checkpoint_secs: Any = USE_DEFAULT,
    save_summaries_steps: Any = USE_DEFAULT,
    save_summaries_secs: Any = USE_DEFAULT,
    log_step_count_steps: Optional[int] = 100,
    save_checkpoint_steps: Any = USE_DEFAULT,
    summary_dir: Optional[PathType] = None,
    summary_op: Optional[Mapping[str, Any]] = None,
    max_to_keep: Optional[int] = 5,
    fabric: Any = None,
    across_ranks: Optional[bool] = None,
    agreement_timeout: float = 300.0,
    stop_on_sigterm: Optional[bool] = None,
    checkpoint_format: Optional[str] = None,
    async_save: bool = False,
) -> MonitoredSession:
    """A :class:`MonitoredSession` with TF's default training hooks, restored from a checkpoint.

    As TF's ``MonitoredTrainingSession``: on the chief the hooks are ``chief_only_hooks``,
    then a :class:`StepCounterHook` (every ``log_step_count_steps`` steps, into
    ``summary_dir``), a :class:`SummarySaverHook`, a :class:`CheckpointSaverHook` (every
    ``save_checkpoint_secs`` seconds or ``save_checkpoint_steps`` steps, into
    ``checkpoint_dir``), then ``hooks``; elsewhere only ``hooks``. Every process restores
    the latest checkpoint of ``checkpoint_dir`` (the highest global step) before
    ``after_create_session``. ``summary_dir`` defaults to ``checkpoint_dir``. Defaults, as
    TF's: a checkpoint every 600 seconds unless ``save_checkpoint_steps`` is given, summaries
    every 100 steps unless ``save_summaries_secs`` is given; ``None``, ``0`` or a negative
    period turns one off (TF's rule). A non-chief process gets ``hooks`` only; it restores
    modules, optimizers, global step and its hooks' state, not the state of the chief's
    ``chief_only_hooks``.

    Differences from TF: keyword arguments only; ``master``, ``scaffold``, ``config``,
    ``stop_grace_period_secs``, ``max_wait_secs`` and ``save_graph_def`` do not exist (no
    graph, no server); there are no summaries collected in a graph, so the
    :class:`SummarySaverHook` is added only when ``summary_op`` (``{tag: fetch}``) is given;
    ``modules``/``optimizers`` are what the checkpoints hold. TF's order puts the
    :class:`CheckpointSaverHook` before ``hooks``; its checkpoint of a run is written once
    every ``after_run`` of the run ran, so it holds every hook's state of that run.

    Args:
        is_chief: whether this process runs the chief's hooks (summaries, checkpoints);
            ``None``: global rank 0 of ``torch.distributed`` when it is initialized, else
            True.
        checkpoint_dir: where checkpoints are restored from and saved to.
        hooks: hooks for every process, called after the default hooks.
        chief_only_hooks: hooks for the chief only, called first.
        modules: the module(s) the loop trains, saved in checkpoints.
        optimizers: the optimizer(s), saved in checkpoints.
        save_checkpoint_secs: seconds between checkpoints (default 600).
        save_summaries_steps: steps between summaries (default 100).
        save_summaries_secs: seconds between summaries.
        log_step_count_steps: steps between ``global_step/sec`` measurements.
        save_checkpoint_steps: steps between checkpoints.
        summary_dir: where the TensorBoard events are written (default ``checkpoint_dir``).
        summary_op: ``{tag: fetch}`` for the :class:`SummarySaverHook`.
        max_to_keep: how many checkpoints the :class:`CheckpointSaverHook` keeps.
        fabric: a launched ``lightning.fabric.Fabric`` (see :class:`MonitoredSession`); it
            also decides the chief (``fabric.is_global_zero``) when ``is_chief`` is ``None``.
        across_ranks: see :class:`MonitoredSession`.
        agreement_timeout: see :class:`MonitoredSession`.
        stop_on_sigterm: see :class:`MonitoredSession` (on by default wherever a
            checkpoint is saved).
        checkpoint_format: see :class:`MonitoredSession`. A sharded checkpoint (``"dcp"``,
            the default for sharded modules) is written by every rank: each runs the
            saver (only the chief deletes old checkpoints).
        async_save: the :class:`CheckpointSaverHook` writes in the background (see its
            ``async_save``).

    With several ranks, every rank must pass the same hooks and ``chief_only_hooks``: the
    chief runs the latter, and the other ranks vote in the session's agreement for what
    they declare (:meth:`~lightning_finalops.SessionRunHook.agreement`), so a chief-only
    hook never issues a collective of its own (an early-stopping hook's decision on the
    chief stops every rank one run later).

    Returns:
        The session, already created (hooks' ``begin`` and ``after_create_session`` ran).

    Raises:
        TypeError: a hook list holds something else than a :class:`SessionRunHook`, or a
            period is not a number.
        ValueError: both ``save_checkpoint_secs`` and
            ``save_checkpoint_steps`` (or both summary periods, with ``summary_op``) are
            positive (the timer's message, raised where TF raised it: when the hook is
            built); on any process, ``summary_op`` is given with neither ``summary_dir`` nor
            ``checkpoint_dir`` to write it to.
    """
    # TF's rule: None, 0 or a negative period turns a hook off; anything else must be a
    # real period (an int of steps, a finite number of seconds), never silently nothing.
    for value, argument in (
        (save_summaries_steps, "save_summaries_steps"),
        (log_step_count_steps, "log_step_count_steps"),
        (save_checkpoint_steps, "save_checkpoint_steps"),
    ):
        if value is not USE_DEFAULT:
            check_int(value, argument, allow_none=True)
    for value, argument in (
        (save_checkpoint_secs, "save_checkpoint_secs"),
        (save_summaries_secs, "save_summaries_secs"),
    ):
        if value is not USE_DEFAULT and check_number(value, argument, allow_none=True) is not None:
            if math.isnan(value) or (math.isinf(value) and value > 0):
                raise ValueError(
                    f"{argument} must be a finite number of seconds (or None, 0 or a negative "
                    f"number to turn it off), got {value!r}."
                )
    # TF's rule too: an empty directory is none (summary_dir "" means checkpoint_dir)
    checkpoint_dir = check_path(checkpoint_dir, "checkpoint_dir", allow_none=True,
                                allow_empty=True) or None
    summary_dir = check_path(summary_dir, "summary_dir", allow_none=True, allow_empty=True)
    max_to_keep = check_int(max_to_keep, "max_to_keep", minimum=0, allow_none=True)
    check_bool(async_save, "async_save")  # the saver checks it only when there is one
    if summary_op is not None and not (summary_dir or checkpoint_dir):
        raise ValueError(
            "summary_op is written to summary_dir (default: checkpoint_dir); pass one of them."
        )
    user_hooks = check_hooks(hooks, "hooks")
    chief_hooks = check_hooks(chief_only_hooks, "chief_only_hooks")
    stoppers = [type(h).__name__ for h in chief_hooks if isinstance(h, StopAtStepHook)]
    if stoppers and world_size() > 1 and across_ranks is not False:
        raise ValueError(
            f"chief_only_hooks holds {stoppers}: with several ranks it would stop the chief "
            "alone and leave the others waiting. Put it in hooks, so every rank stops at the "
            "same step."
        )
    # TF's USE_DEFAULT rules
    if save_summaries_steps is USE_DEFAULT and save_summaries_secs is USE_DEFAULT:
        save_summaries_steps, save_summaries_secs = 100, None
    elif save_summaries_steps is USE_DEFAULT:
        save_summaries_steps = None
    elif save_summaries_secs is USE_DEFAULT:
        save_summaries_secs = None
    if save_checkpoint_secs is USE_DEFAULT and save_checkpoint_steps is USE_DEFAULT:
        save_checkpoint_steps, save_checkpoint_secs = None, 600
    elif save_checkpoint_secs is USE_DEFAULT:
        save_checkpoint_secs = None
    elif save_checkpoint_steps is USE_DEFAULT:
        save_checkpoint_steps = None

    # TF's rule: a period is on when it is > 0; the hooks get None for an off period
    save_summaries_steps, save_summaries_secs = _on(save_summaries_steps), _on(save_summaries_secs)
    save_checkpoint_steps, save_checkpoint_secs = (
        _on(save_checkpoint_steps),
        _on(save_checkpoint_secs),
    )
    check_bool(is_chief, "is_chief", allow_none=True)
    check_fabric(fabric)
    if is_chief is None:
        is_chief = bool(fabric.is_global_zero) if fabric is not None else is_rank_zero()
    saver: List[SessionRunHook] = []  # on every rank with Fabric (fabric.save is a collective)
    if checkpoint_dir and (save_checkpoint_secs or save_checkpoint_steps):
        saver.append(
            CheckpointSaverHook(
                checkpoint_dir,
                save_secs=save_checkpoint_secs,
                save_steps=save_checkpoint_steps,
                max_to_keep=max_to_keep,
                async_save=async_save,
            )
        )
    # The chief's hooks, built on every rank: the others vote for what they declare.
    chief_side: List[SessionRunHook] = list(chief_hooks)
    summary_dir = summary_dir or checkpoint_dir
    if summary_dir:
        if _on(log_step_count_steps) is not None:
            chief_side.append(
                StepCounterHook(output_dir=summary_dir, every_n_steps=log_step_count_steps)
            )
        if summary_op is not None and (save_summaries_steps or save_summaries_secs):
            chief_side.append(
                SummarySaverHook(
                    save_steps=save_summaries_steps,
                    save_secs=save_summaries_secs,
                    output_dir=summary_dir,
                    summary_op=summary_op,
                )
            )
    # fabric.save and sharded saves are collectives: every rank runs the saver
    every_rank_saves = fabric is not None or checkpoint_format == "dcp" or (
        checkpoint_format is None and holds_sharded_tensors(
            named_objects(modules, "modules", torch.nn.Module).values()))
    if not every_rank_saves:
        chief_side.extend(saver)
    all_hooks: List[SessionRunHook] = []
    if is_chief:
        all_hooks.extend(chief_side)
    else:
        several = world_size() > 1 and across_ranks is not False
        for hook in chief_side:
            if has_state(hook):
                all_hooks.append(_ChiefHookState(hook.state_key, hook.agreement()))
            elif several and hook.agreement():
                all_hooks.append(_ChiefHookAgreement(hook.agreement()))
    if every_rank_saves:
        all_hooks.extend(saver)
    all_hooks.extend(user_hooks)
    return MonitoredSession(
        all_hooks,
        modules,
        optimizers,
        checkpoint_dir=checkpoint_dir,
        is_chief=is_chief,
        fabric=fabric,
        across_ranks=across_ranks,
        agreement_timeout=agreement_timeout,
        stop_on_sigterm=stop_on_sigterm,
        checkpoint_format=checkpoint_format,
    )

