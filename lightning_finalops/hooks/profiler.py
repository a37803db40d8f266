"""``ProfilerHook``: a ``torch.profiler`` Chrome trace of one run every N steps or seconds."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import weakref
from typing import Any, Optional, Union

from lightning_finalops.hooks.timers import SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    Agreement,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.validation import check_bool, check_path

__all__ = ["ProfilerHook"]

logger = logging.getLogger("lightning_finalops")

PathType = Union[str, "os.PathLike[str]"]

# A torch profile can be exported once ("Trace is already saved."): when several ProfilerHooks
# receive the same run's profile, the first exports it and the others copy that file.
_exported_lock = threading.Lock()
_exported: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _export_chrome_trace(profile: Any, path: str) -> None:
    with _exported_lock:
        first = _exported.get(profile)
        if first is not None and os.path.exists(first):
            if os.path.abspath(first) != os.path.abspath(path):
                shutil.copyfile(first, path)
            return
        profile.export_chrome_trace(path)
        _exported[profile] = path


class ProfilerHook(SessionRunHook):
    """Records one run with ``torch.profiler`` every N steps or seconds, as a Chrome trace.

    The first run of a session is never traced: it starts the timer at the global step
    before it, as TF does. Before each later run the timer is checked for the global step the
    run will have (``session.global_step + 1``); when it is due, the hook asks for a trace with
    ``RunOptions(trace_level=FULL_TRACE)``, both adapters record that run with
    ``torch.profiler`` and hand the finished profile to ``after_run``, which writes it to
    ``<output_dir>/timeline-<global_step>.json`` (Chrome trace format, open it in
    ``chrome://tracing`` or Perfetto, or with TensorBoard's profiler plugin). With
    ``save_steps=2`` the traces are of global steps 2, 4, 6... Only the chief
    (``session.is_chief``) asks for traces and writes them.

    There is no graph: TF's ``"Global step should be created to use ProfilerHook."`` error
    does not exist, and nothing is written to a TensorBoard events file (TF also added the run
    metadata as ``step_<N>``); the trace file is the whole output.

    Args:
        save_steps: trace every N global steps. Exactly one of ``save_steps`` and
            ``save_secs``.
        save_secs: trace at most every N seconds.
        output_dir: the directory of the trace files (created if missing); ``""`` is the
            current directory.
        show_dataflow: record operator input shapes (``record_shapes``), the nearest
            torch.profiler equivalent of TF's dataflow arrows.
        show_memory: record tensor allocations and frees (``profile_memory``).

    Raises:
        ValueError: the timer's ``"Either every_secs or every_steps should be provided."`` /
            ``"Can not provide both every_secs and every_steps."`` (TF's messages).
        TypeError: ``output_dir`` is not a path.
    """

    def __init__(
        self,
        save_steps: Optional[int] = None,
        save_secs: Optional[float] = None,
        output_dir: PathType = "",
        show_dataflow: bool = True,
        show_memory: bool = False,
    ) -> None:
        self._output_dir = check_path(output_dir, "output_dir", allow_empty=True)
        self._show_dataflow = check_bool(show_dataflow, "show_dataflow")
        self._show_memory = check_bool(show_memory, "show_memory")
        self._timer = SecondOrStepTimer(
            every_secs=save_secs, every_steps=save_steps, secs_argument="save_secs",
            steps_argument="save_steps",
        )
        self._stale_global_step: Optional[int] = None
        self._primed = False
        self._request_trace = False
        self._warned_no_profile = False

    def agreement(self) -> Agreement:
        """Rank 0's clock when it traces on seconds (so every rank traces at the same step)."""
        return Agreement(time=self._timer.uses_time)

    @property
    def output_dir(self) -> str:
        """The directory the trace files are written to."""
        return self._output_dir

    def begin(self) -> None:
        """The next run is the session's first: it primes the timer and is not traced."""
        self._primed = False
        self._request_trace = False

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Ask for a trace of this run if the timer is due for the step it will have."""
        session = run_context.session
        self._stale_global_step = session.global_step
        self._request_trace = (
            self._primed
            and session.is_chief
            and self._timer.should_trigger_for_step(session.global_step + 1)
        )
        if not self._request_trace:
            return None
        return SessionRunArgs(
            fetches=None,
            options=RunOptions(
                trace_level=RunOptions.FULL_TRACE,
                profile_memory=self._show_memory,
                record_shapes=self._show_dataflow,
            ),
        )

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Write the run's trace to ``timeline-<global_step>.json`` if one was asked for."""
        if not self._primed:
            # Start counting from the step before the first run, so it is never traced.
            assert self._stale_global_step is not None
            self._timer.update_last_triggered_step(self._stale_global_step)
            self._primed = True
        if not self._request_trace:
            return
        global_step = run_context.session.global_step
        self._timer.update_last_triggered_step(global_step)
        profile = run_values.run_metadata.profile
        if profile is None:
            if not self._warned_no_profile:
                self._warned_no_profile = True
                logger.warning(
                    "ProfilerHook asked for a trace of global step %d, but the engine delivered "
                    "no profile in run_metadata.profile; nothing written.", global_step
                )
            return
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
        path = os.path.join(self._output_dir, f"timeline-{global_step}.json")
        logger.info("Saving timeline for %d into '%s'.", global_step, path)
        _export_chrome_trace(profile, path)
