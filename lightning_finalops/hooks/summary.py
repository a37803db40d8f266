"""``SummarySaverHook`` and ``StepCounterHook``: TensorBoard summaries on a step schedule.

Both write through ``torch.utils.tensorboard.SummaryWriter`` (TensorBoard is a dependency of
the package), imported only when a hook is given an ``output_dir`` to write to, never when
this module is imported. Both hooks also send
their scalars to the engine's loggers through ``session.log_metrics`` (Lightning's
``trainer.loggers``; nothing in a plain loop), so they are useful under Lightning without a
TensorBoard directory of their own.
"""

from __future__ import annotations

import logging
import os
import threading
from numbers import Number
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from lightning_finalops.fetches import check_fetches, leaves, path_tag, to_host
from lightning_finalops.hooks.timers import SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    Agreement,
    RawSession,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.sync_audit import host_values
from lightning_finalops.validation import check_path

__all__ = [
    "StepCounterHook",
    "SummarySaverHook",
    "SummaryWriterCache",
]

logger = logging.getLogger("lightning_finalops")

PathType = Union[str, "os.PathLike[str]"]

def _summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, imported on first need.

    Raises:
        ImportError: the tensorboard package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "Writing TensorBoard summaries needs the tensorboard package, a dependency of "
            "lightning_finalops that this environment lacks: pip install tensorboard. "
            "(MonitoredTrainingSession writes summaries by default, as TF did: "
            "save_summaries_steps=None and save_summaries_secs=None turn that off.) "
            f"({e})"
        ) from e
    return SummaryWriter


class SummaryWriterCache:
    """One ``SummaryWriter`` per output directory per process, as TF's ``SummaryWriterCache``.

    Hooks writing to the same directory share one events file. The key includes the process
    id: a forked worker never reuses its parent's writer (whose writer thread did not follow).
    """

    _lock = threading.Lock()
    _writers: Dict[Tuple[int, str], Any] = {}

    @classmethod
    def get(cls, logdir: PathType) -> Any:
        """The writer for ``logdir``, created (with the directory) on first request.

        Raises:
            ImportError: the tensorboard package is not installed.
        """
        key = (os.getpid(), os.path.abspath(os.fspath(logdir)))
        with cls._lock:
            writer = cls._writers.get(key)
            if writer is None:
                writer = _summary_writer_class()(log_dir=key[1])
                cls._writers[key] = writer
            return writer

    @classmethod
    def clear(cls) -> None:
        """Close and forget every writer of this process."""
        with cls._lock:
            pid = os.getpid()
            for key in [key for key in cls._writers if key[0] == pid]:
                cls._writers.pop(key).close()


def _check_writer(summary_writer: Any, methods: Tuple[str, ...]) -> Any:
    if summary_writer is None:
        return None
    missing = [m for m in methods if not callable(getattr(summary_writer, m, None))]
    if missing:
        raise TypeError(
            "summary_writer must be a torch.utils.tensorboard.SummaryWriter (or have "
            f"{', '.join(m + '()' for m in methods)}), got {type(summary_writer).__name__} "
            f"without {', '.join(m + '()' for m in missing)}."
        )
    return summary_writer


class _WriterHolder:
    """The writer a hook writes to: the one it was given, else the cached one of its dir."""

    __slots__ = ("_given", "_output_dir", "writer")

    def __init__(self, summary_writer: Any, output_dir: Optional[str]) -> None:
        self._given = summary_writer
        self._output_dir = output_dir
        self.writer: Any = summary_writer

    @property
    def wanted(self) -> bool:
        """Whether the hook writes summaries at all (TF: a writer or an output_dir)."""
        return self._given is not None or bool(self._output_dir)

    def check_available(self) -> None:
        """Fail before the session starts if an output_dir cannot be written (no tensorboard)."""
        if self._given is None and self._output_dir:
            _summary_writer_class()

    def get(self) -> Any:
        """The writer, created on first use (only the chief calls this)."""
        if self.writer is None and self._output_dir:
            self.writer = SummaryWriterCache.get(self._output_dir)
        return self.writer

    def flush(self) -> None:
        """Flush the writer if this hook used one."""
        if self.writer is not None:
            self.writer.flush()


def _collect(tag: str, value: Any, scalars: Dict[str, float], tensors: Dict[str, Any]) -> None:
    """Sort one evaluated summary value (host side) into scalars and histograms by tag.

    A value that is a dict or list is written under ``tag/key``.
    """
    for path, leaf in leaves(value, (tag,)):
        assert path is not None
        at = path_tag(path)
        if leaf is None:
            continue
        if isinstance(leaf, (torch.Tensor, np.ndarray)):
            size = leaf.size if isinstance(leaf, np.ndarray) else leaf.numel()
            if size == 0:
                logger.warning("SummarySaverHook: summary %r is empty; nothing written.", at)
            elif size == 1:
                scalars[at] = float(leaf.item())
            else:
                tensors[at] = leaf
        elif isinstance(leaf, Number):
            scalars[at] = float(leaf)  # type: ignore[arg-type]
        else:
            raise TypeError(
                f"SummarySaverHook: summary_op[{at!r}] evaluated to {type(leaf).__name__} "
                f"({leaf!r:.60}); a summary needs a tensor, an array or a number."
            )


class SummarySaverHook(SessionRunHook):
    """Evaluates ``summary_op`` and writes it to TensorBoard every N steps or seconds.

    The first run of every session writes; after that a run writes when the timer triggers for
    the global step the run will have (``session.global_step + 1``, decided in ``before_run``
    as TF does), so ``save_steps=8`` writes at global steps 1, 9, 17, 25. Only those runs fetch
    anything: on the others ``before_run`` returns ``None`` (no evaluation, no transfer). On a
    writing run every value is brought to the host in one transfer and written at the
    session's global step (the run included): a value with one element with ``add_scalar``,
    anything larger with ``add_histogram``. The scalars are also sent to
    ``session.log_metrics`` (under Lightning: the trainer's loggers; a plain loop: nowhere).
    Every process evaluates the fetches (a metric's ``compute()`` may be a collective), only the
    chief (``session.is_chief``) writes. ``end()`` flushes the writer.

    With neither ``summary_writer`` nor ``output_dir`` nothing is written to TensorBoard (TF's
    silent no-op), but the scalars still go to ``session.log_metrics``. There is no graph: TF's
    ``"Global step should be created to use SummarySaverHook."`` error and ``SessionLog.START``
    event do not exist here.

    Args:
        save_steps: write every N global steps. Exactly one of ``save_steps`` and
            ``save_secs``.
        save_secs: write at most every N seconds.
        output_dir: the directory of the events file, used when no ``summary_writer`` is
            given; one ``SummaryWriter`` per directory per process is shared by every hook.
            Needs the ``tensorboard`` package.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar``, ``add_histogram`` and ``flush``) to write to instead.
        scaffold: accepted for TF's signature and validation only: there is no ``Scaffold``
            here, so a non-``None`` scaffold raises ``ValueError``.
        summary_op: ``{tag: fetch}``; each fetch follows the fetch rules (a tensor, a metric,
            a callable, a name from the step's returned dict or the logged metrics). A value
            that is itself a dict or list is written under ``tag/key``.

    Raises:
        ValueError: ``"Exactly one of scaffold or summary_op must be provided."``; then the
            timer's ``"Either every_secs or every_steps should be provided."`` /
            ``"Can not provide both every_secs and every_steps."`` (TF's messages, in TF's
            order); then a ``scaffold`` was given.
        TypeError: ``summary_op`` is not a dict of str tags to fetches (the message names the
            position), ``output_dir`` is not a path, or ``summary_writer`` lacks a method.
        ImportError: in ``begin()``, ``output_dir`` is set and tensorboard is not installed.
    """

    def __init__(
        self,
        save_steps: Optional[int] = None,
        save_secs: Optional[float] = None,
        output_dir: Optional[PathType] = None,
        summary_writer: Any = None,
        scaffold: Any = None,
        summary_op: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if (scaffold is None) == (summary_op is None):
            raise ValueError("Exactly one of scaffold or summary_op must be provided.")
        self._timer = SecondOrStepTimer(
            every_secs=save_secs, every_steps=save_steps, secs_argument="save_secs",
            steps_argument="save_steps",
        )
        if scaffold is not None:
            raise ValueError(
                f"SummarySaverHook got scaffold={type(scaffold).__name__}, but lightning_finalops "
                "has no Scaffold or graph summary collection: pass summary_op={tag: fetch} "
                "instead (for example {'loss': 'loss', 'w': lambda: model.layer.weight})."
            )
        if not isinstance(summary_op, Mapping):
            raise TypeError(
                "summary_op must be a dict {tag: fetch} (TF's summary tensors have no PyTorch "
                f"equivalent), got {type(summary_op).__name__} ({summary_op!r:.60})."
            )
        for tag in summary_op:
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"summary_op tags must be non-empty str, got {tag!r}.")
        check_fetches(summary_op, "summary_op")
        self._summary_op = summary_op
        self._writer = _WriterHolder(
            _check_writer(summary_writer, ("add_scalar", "add_histogram", "flush")),
            check_path(output_dir, "output_dir", allow_none=True, allow_empty=True),
        )
        self._first_run = True
        self._request_summary = False

    def agreement(self) -> Agreement:
        """Rank 0's clock when it saves on seconds (so every rank writes at the same step)."""
        return Agreement(time=self._timer.uses_time)

    def begin(self) -> None:
        """The next run is the session's first: it writes.

        Raises:
            ImportError: ``output_dir`` is set and tensorboard is not installed.
        """
        self._writer.check_available()
        self._first_run = True
        self._request_summary = False

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Fetch ``summary_op`` if this run writes (first run, or the timer is due)."""
        next_step = run_context.session.global_step + 1
        self._request_summary = self._first_run or self._timer.should_trigger_for_step(next_step)
        return SessionRunArgs(self._summary_op) if self._request_summary else None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Write the fetched values at the session's global step (chief only)."""
        self._first_run = False
        if not self._request_summary:
            return
        session = run_context.session
        global_step = session.global_step
        self._timer.update_last_triggered_step(global_step)
        if not session.is_chief:
            return
        values = to_host(run_values.results)  # the write's one wait
        scalars: Dict[str, float] = {}
        tensors: Dict[str, Any] = {}
        with host_values():
            for tag, value in values.items():
                _collect(tag, value, scalars, tensors)
        if self._writer.wanted:
            writer = self._writer.get()
            for tag, scalar in scalars.items():
                writer.add_scalar(tag, scalar, global_step)
            for tag, tensor in tensors.items():
                if isinstance(tensor, torch.Tensor):
                    tensor = tensor.to(torch.float64)
                writer.add_histogram(tag, tensor, global_step)
        if scalars:
            session.log_metrics(scalars, global_step)

    def end(self, session: Optional[RawSession]) -> None:
        """Flush the writer so the events are on disk."""
        self._writer.flush()


_NOT_INCREASED_WARNING = (
    "It seems that global step (tf.train.get_global_step) has not been increased. "
    "Current value (could be stable): %s vs previous value: %s. The global step is the "
    "session's count of completed training runs: MonitoredSession.run() advances it by one; "
    "under Lightning it is trainer.global_step, which counts optimizer steps and stays put "
    "while gradients accumulate (accumulate_grad_batches) or when an optimizer step is skipped."
)


class StepCounterHook(SessionRunHook):
    """Measures global steps per second every N steps or seconds and writes it.

    After each run the timer is checked against the session's global step (the run
    included). The first trigger of a session only starts the clock; every later trigger
    computes ``elapsed_steps / elapsed_secs`` since the previous one and writes it with tag
    ``global_step/sec`` at that global step: to TensorBoard (if a writer or ``output_dir``),
    to ``session.log_metrics`` (under Lightning: the trainer's loggers) and to the
    ``lightning_finalops`` logger at INFO (``"global_step/sec: %g"``), on the chief only. So
    ``every_n_steps=10`` over 30 runs writes at global steps 11 and 21. When the global step
    did not advance in a run, TF's "has not been increased" warning is logged (the first 5
    times per hook). It fetches nothing, so it costs no device transfer. Time is read through
    ``lightning_finalops.hooks.timers.clock``.

    There is no graph: TF's ``"Global step should be created to use StepCounterHook."`` error
    does not exist here, and the tag is always ``global_step/sec`` (TF named it after the
    global step variable).

    Args:
        every_n_steps: measure every N global steps. Pass ``every_n_steps=None`` to use
            ``every_n_secs``.
        every_n_secs: measure at most every N seconds.
        output_dir: the directory of the events file, used when no ``summary_writer`` is
            given (shared per directory per process). Needs the ``tensorboard`` package.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar`` and ``flush``) to write to instead.

    Raises:
        ValueError: ``"exactly one of every_n_steps and every_n_secs should be provided."``
            (TF's message).
        TypeError: ``output_dir`` is not a path, or ``summary_writer`` lacks a method.
        ImportError: in ``begin()``, ``output_dir`` is set and tensorboard is not installed.
    """

    SUMMARY_TAG = "global_step/sec"
    WARN_FIRST_N = 5

    def __init__(
        self,
        every_n_steps: Optional[int] = 100,
        every_n_secs: Optional[float] = None,
        output_dir: Optional[PathType] = None,
        summary_writer: Any = None,
    ) -> None:
        if (every_n_steps is None) == (every_n_secs is None):
            raise ValueError("exactly one of every_n_steps and every_n_secs should be provided.")
        self._timer = SecondOrStepTimer(
            every_steps=every_n_steps, every_secs=every_n_secs, secs_argument="every_n_secs",
            steps_argument="every_n_steps",
        )
        self._writer = _WriterHolder(
            _check_writer(summary_writer, ("add_scalar", "flush")),
            check_path(output_dir, "output_dir", allow_none=True, allow_empty=True),
        )
        self._last_global_step: Optional[int] = None
        self._warnings_logged = 0

    def agreement(self) -> Agreement:
        """Rank 0's clock when it measures on seconds (so every rank measures at the same step)."""
        return Agreement(time=self._timer.uses_time)

    def begin(self) -> None:
        """Start a new measurement: the session's first trigger only primes the clock.

        Raises:
            ImportError: ``output_dir`` is set and tensorboard is not installed.
        """
        self._writer.check_available()
        self._timer.reset()
        self._last_global_step = None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Measure and write steps/sec when the timer triggers; warn if the step is stuck."""
        session = run_context.session
        global_step = session.global_step
        if self._timer.should_trigger_for_step(global_step):
            elapsed_secs, elapsed_steps = self._timer.update_last_triggered_step(global_step)
            if elapsed_secs is not None and session.is_chief:
                self._log_and_record(session, elapsed_steps, elapsed_secs, global_step)
        if global_step == self._last_global_step and self._warnings_logged < self.WARN_FIRST_N:
            self._warnings_logged += 1
            logger.warning(_NOT_INCREASED_WARNING, global_step, self._last_global_step)
        self._last_global_step = global_step

    def _log_and_record(self, session: RawSession, elapsed_steps: Any, elapsed_secs: float,
                        global_step: int) -> None:
        if elapsed_secs <= 0:  # a clock that did not move: no rate to report
            return
        steps_per_sec = elapsed_steps / elapsed_secs
        if self._writer.wanted:
            self._writer.get().add_scalar(self.SUMMARY_TAG, steps_per_sec, global_step)
        session.log_metrics({self.SUMMARY_TAG: steps_per_sec}, global_step)
        logger.info("%s: %g", self.SUMMARY_TAG, steps_per_sec)

    def end(self, session: Optional[RawSession]) -> None:
        """Flush the writer so the events are on disk."""
        self._writer.flush()
