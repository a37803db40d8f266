"""Hooks that stop, fail or hold back a session (``StopAtStepHook``, ``NanTensorHook``...)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from lightning_finalops.fetches import check_fetches, to_host
from lightning_finalops.session_run_hook import (
    AgreedValue,
    Agreement,
    Coordinator,
    RawSession,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.sync_audit import host_values, note_sync
from lightning_finalops.validation import check_bool, check_int

__all__ = [
    "GlobalStepWaiterHook",
    "NanLossDuringTrainingError",
    "NanTensorHook",
    "StopAtStepHook",
]

logger = logging.getLogger("lightning_finalops")

# GlobalStepWaiterHook sleeps through this name, so tests control the waiting without
# sleeping (``monkeypatch.setattr(lightning_finalops.hooks.stop, "sleep", fake)``).
sleep: Callable[[float], None] = time.sleep

_POLL_SECS = 0.5
_LOG_EVERY_STEPS = 1000


class StopAtStepHook(SessionRunHook):
    """Requests a stop in the ``after_run`` of the run whose global step reaches the last step.

    The last step is ``last_step``, or the session's global step when it is created plus
    ``num_steps`` (computed in ``after_create_session``, after a checkpoint was restored: a
    resumed run stops ``num_steps`` runs after the restored step). The check reads the raw
    session's ``global_step`` (a host integer) in ``after_run``, so the hook fetches nothing
    and costs nothing per run; at least one run always happens. From step 0, ``last_step=5``
    lets exactly 5 runs happen. There is no graph, so TF's "Global step should be created"
    error does not exist here; each session (each ``begin()``) computes its own last step.

    Args:
        num_steps: the number of runs to do in this session.
        last_step: the global step after which to stop.

    Raises:
        ValueError: ``"One of num_steps or last_step must be specified."`` or
            ``"Only one of num_steps or last_step can be specified."`` (TF's messages), or
            ``num_steps`` < 1 or ``last_step`` < 0.
        TypeError: ``num_steps`` or ``last_step`` is not an int.
    """

    def __init__(self, num_steps: Optional[int] = None, last_step: Optional[int] = None) -> None:
        if num_steps is None and last_step is None:
            raise ValueError("One of num_steps or last_step must be specified.")
        if num_steps is not None and last_step is not None:
            raise ValueError("Only one of num_steps or last_step can be specified.")
        num_steps = check_int(num_steps, "num_steps", minimum=1, allow_none=True)
        last_step = check_int(last_step, "last_step", minimum=0, allow_none=True)
        self._num_steps = num_steps
        self._given_last_step = last_step
        self._last_step = last_step

    def agreement(self) -> Agreement:
        """Nothing to agree on: every rank computes the same last step and stops there."""
        return Agreement()

    @property
    def last_step(self) -> Optional[int]:
        """The global step to stop at; ``None`` until the session computed it from ``num_steps``."""
        return self._last_step

    def begin(self) -> None:
        """Forget a last step computed from ``num_steps`` in an earlier session."""
        self._last_step = self._given_last_step

    def job_finished(self, global_step: int) -> bool:
        """Whether ``last_step`` was given and ``global_step`` reached it.

        Then the session is a finished job run again and creates no session
        (``Estimator.train`` skipped training; TF's ``MonitoredSession`` ran one more step).
        """
        return self._given_last_step is not None and global_step >= self._given_last_step

    def after_create_session(self, session: RawSession, coord: Coordinator) -> None:
        """With ``num_steps``: the last step is the session's (restored) global step + N."""
        if self._last_step is None:
            assert self._num_steps is not None
            self._last_step = session.global_step + self._num_steps

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Request a stop once the global step (this run included) reaches the last step."""
        if self._last_step is None:
            raise RuntimeError(
                "StopAtStepHook(num_steps=...) computes its last step in after_create_session, "
                "which was not called for this session."
            )
        if run_context.session.global_step >= self._last_step:
            # the global step is the same on every rank: so is this decision
            run_context.request_stop(rank_consistent=True)


class NanLossDuringTrainingError(RuntimeError):
    """Raised by :class:`NanTensorHook` when the loss is NaN."""

    def __str__(self) -> str:
        return "NaN loss during training."


class NanTensorHook(SessionRunHook):
    """Checks the loss after every run and fails (or stops) when it is NaN.

    Every run fetches ``loss_tensor``; ``after_run`` reduces it on its device to one
    "is any element NaN" flag and brings that flag to the host with a single
    :func:`~lightning_finalops.to_host` transfer. That transfer is the hook's cost: on a GPU
    the host waits, once per run, for the step's kernels to finish (TF's hook fetched the loss
    every run for the same reason). When the loss is NaN it logs ``"Model diverged with loss =
    NaN."`` and, with ``fail_on_nan_loss``, raises :class:`NanLossDuringTrainingError` from
    ``after_run`` (later hooks' ``after_run`` and every ``end()`` are skipped; it escapes
    ``Trainer.fit``), else logs a warning and requests a stop (the run completes, ``end()``
    runs).

    With several ranks (a session whose ranks agree) a NaN on one rank reaches every rank
    in the session's vote: every rank raises (or stops) at the same step, the run after
    the NaN (under Lightning DDP the raise, a hook's failure there, lands one batch later
    again, on every rank together), so no rank is left waiting for one that failed.

    Args:
        loss_tensor: a fetch for the loss: a tensor, a name such as ``"loss"`` (the step's
            returned dict, then the session's named values), a callable or a metric. It must
            evaluate to a tensor or a number; a tensor with several elements fails if any is
            NaN.
        fail_on_nan_loss: raise rather than request a stop.
        non_blocking: on CUDA, never make the host wait: the flag of run k is copied to the
            host without waiting and read in run k+1's ``after_run`` (by then it has long
            arrived), so the failure or stop comes one run later; the last run's flag is
            read in ``end()``, which fails there (or logs the NaN) if it is set. A saver
            listed before this hook may have written run k's NaN weights by then. (On
            other accelerators reading the flag still waits, one run later.)

    Raises:
        TypeError: ``loss_tensor`` is ``None`` or cannot be fetched.
    """

    def __init__(self, loss_tensor: Any, fail_on_nan_loss: bool = True, *,
                 non_blocking: bool = False) -> None:
        if loss_tensor is None:
            raise TypeError(
                "loss_tensor must be a tensor, a name, a callable or a metric, got None."
            )
        check_fetches(loss_tensor, "loss_tensor")
        self._loss_tensor = loss_tensor
        self._fail_on_nan_loss = check_bool(fail_on_nan_loss, "fail_on_nan_loss")
        self._non_blocking = check_bool(non_blocking, "non_blocking")
        self._pending: Any = None  # (host flag, event or None) of the previous run
        self._nan = AgreedValue()  # ranks that saw a NaN, agreed a run later
        self._agreeing = False

    def agreement(self) -> Agreement:
        """The ranks that saw a NaN (a value summed over ranks): every rank acts on it."""
        return Agreement(values=(self._nan,))

    def begin(self) -> None:
        """Forget a flag of an earlier session."""
        self._pending = None
        self._agreeing = False

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Fetch the loss (left on its device)."""
        return SessionRunArgs(self._loss_tensor)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Fail or request a stop if the fetched loss is NaN.

        Raises:
            NanLossDuringTrainingError: the loss is NaN and ``fail_on_nan_loss`` is set.
            TypeError: the loss evaluated to something else than a tensor or a number.
        """
        self._agreeing = run_context.session.agrees_across_ranks
        if self._agreeing and self._nan.agreed:  # a rank saw NaN in the previous run
            self._diverged(run_context, agreed=True)
            return
        if self._non_blocking:
            previous, self._pending = self._pending, self._send_flag(run_values.results)
            if not self._read_flag(previous):
                return
        elif not self._is_nan(run_values.results):
            return
        if self._agreeing:
            # every rank fails (or stops) at the same run: the next, which reads the vote
            logger.warning("NaN loss on this rank at global step %d: every rank of the session "
                           "%s in the next run.", run_context.session.global_step,
                           "fails" if self._fail_on_nan_loss else "stops")
            self._nan.post(1.0)
            return
        self._diverged(run_context)

    def end(self, session: Optional[RawSession]) -> None:
        """With ``non_blocking``, read the last run's flag: fail (or log) if it is set.

        Raises:
            NanLossDuringTrainingError: the last run's loss is NaN and ``fail_on_nan_loss``.
        """
        pending, self._pending = self._pending, None
        if self._read_flag(pending) or (self._agreeing and self._nan.agreed):
            self._diverged(None)

    def _send_flag(self, loss: Any) -> Any:
        """Start copying the run's NaN flag to the host, without waiting."""
        loss = self._as_tensor(loss)
        if not (loss.is_floating_point() or loss.is_complex()):
            return None
        flag = torch.isnan(loss).any()
        if flag.device.type != "cuda":
            return flag, None
        with torch.cuda.device(flag.device):  # the event on the stream of the flag's device
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return host, event

    @staticmethod
    def _read_flag(pending: Any) -> bool:
        if pending is None:
            return False
        host, event = pending
        if event is not None and not event.query():
            event.synchronize()  # a whole run later: only when the device is that far behind
            note_sync()
        with host_values():  # a host copy that has arrived: reading it waits for nothing
            return bool(host)

    def _diverged(self, run_context: Optional[SessionRunContext], agreed: bool = False) -> None:
        failure_message = "Model diverged with loss = NaN."
        if self._fail_on_nan_loss:
            logger.error(failure_message)
            raise NanLossDuringTrainingError
        logger.warning(failure_message)
        if run_context is not None:
            run_context.request_stop(rank_consistent=agreed)

    def _is_nan(self, loss: Any) -> bool:
        loss = self._as_tensor(loss)
        if not (loss.is_floating_point() or loss.is_complex()):
            return False  # integers and booleans cannot be NaN: no transfer at all
        flag = to_host(torch.isnan(loss).any())  # the run's one wait
        with host_values():
            return bool(flag)

    @staticmethod
    def _as_tensor(loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            try:
                loss = torch.as_tensor(loss)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(
                    "NanTensorHook: loss_tensor must evaluate to a tensor or a number, got "
                    f"{type(loss).__name__} ({loss!r})."
                ) from e
        return loss


class GlobalStepWaiterHook(SessionRunHook):
    """Holds the first run of a session until the global step reaches ``wait_until_step``.

    Before the session's first run it polls the raw session's ``global_step`` every 0.5 s
    (sleeping through this module's ``sleep``), logging at INFO level when it starts waiting
    and every 1000 steps of progress, until ``global_step >= wait_until_step``; then runs go
    on without further checks until the next ``begin()``. ``wait_until_step <= 0`` starts at
    once. The global step is the session's own: in one process it only advances by that
    session's runs, so the hook is useful when the step was restored (a resumed worker
    already past the step starts at once) or when the session's ``global_step`` is shared
    with other processes; otherwise it waits forever. Under DDP every rank must wait for the
    same step, or the ranks that start block in their first collective. There is no graph,
    so TF's "Global step should be created" error does not exist here.

    Args:
        wait_until_step: the global step to wait for.

    Raises:
        TypeError: ``wait_until_step`` is not an int.
    """

    def __init__(self, wait_until_step: int) -> None:
        self._wait_until_step = check_int(wait_until_step, "wait_until_step")
        self._worker_is_started = False

    def agreement(self) -> Agreement:
        """Nothing to agree on: it only waits."""
        return Agreement()

    def begin(self) -> None:
        """A new session waits again."""
        self._worker_is_started = False

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Block until the global step reaches ``wait_until_step`` (first run only)."""
        if self._worker_is_started:
            return None
        if self._wait_until_step <= 0:
            self._worker_is_started = True
            return None
        logger.info(
            "Waiting for global step %d before starting training.", self._wait_until_step
        )
        last_logged_step = 0
        while True:
            current_step = run_context.session.global_step
            if current_step >= self._wait_until_step:
                self._worker_is_started = True
                return None
            if current_step - last_logged_step > _LOG_EVERY_STEPS:
                logger.info(
                    "Waiting for global step %d before starting training. Current step is %d.",
                    self._wait_until_step,
                    current_step,
                )
                last_logged_step = current_step
            sleep(_POLL_SECS)
