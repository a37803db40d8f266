"""The session-hook contract: TensorFlow's ``session_run_hook.py`` on PyTorch.

A *session* is one run of a loop with a fixed list of hooks (one ``Trainer.fit``, one
validation run, one ``with MonitoredSession(...)`` block). A *run* is one step. Hooks are
called in list order at every point, nothing reversed:

```
begin()                               # once, before anything exists on the device
after_create_session(session, coord)  # the session is ready (state restored)
before_run(run_context) -> SessionRunArgs | None   # before every run
after_run(run_context, run_values)    # after every run that succeeded
end(session)                          # once, when the session ends cleanly
```
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Tuple

from lightning_finalops.validation import is_int

__all__ = [
    "AgreedValue",
    "Agreement",
    "Coordinator",
    "RawSession",
    "RunMetadata",
    "RunOptions",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
]


class AgreedValue:
    """A number a hook agrees on across the ranks of a session: their sum, a run later.

    A hook declares it in :meth:`SessionRunHook.agreement`, :meth:`post` s this rank's
    value in a run (``after_run``), and reads :attr:`agreed` in a later run: the sum over
    the ranks of what each posted in the previous run (a rank that posted nothing counts
    0). The sum travels in the session's one vote per run, so it costs no collective of
    its own. Only a session whose ranks agree (``session.agrees_across_ranks``) carries
    it: with one process, decide on the local value at once, as TensorFlow did.

    ```python
    class StopWhenAnyRankDiverges(SessionRunHook):
        def __init__(self):
            self.diverged = AgreedValue()

        def agreement(self):
            return Agreement(values=(self.diverged,))

        def after_run(self, run_context, run_values):
            if self.diverged.agreed:  # some rank posted 1 in the previous run
                run_context.request_stop(rank_consistent=True)  # every rank reads the same sum
            self.diverged.post(float(loss_is_diverging()))
    ```
    """

    __slots__ = ("posted", "_agreed")

    def __init__(self) -> None:
        #: what this rank posts in the current run (reset after each vote)
        self.posted = 0.0
        self._agreed: Optional[float] = None

    def post(self, value: float) -> None:
        """Give this rank's value for the current run (the last post of a run counts).

        Raises:
            TypeError: ``value`` is not a real number (bools count as 0 and 1).
            ValueError: it is not finite.
        """
        if not isinstance(value, (int, float)):
            raise TypeError(f"AgreedValue.post() takes a number, got {type(value).__name__}.")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"AgreedValue.post() takes a finite number, got {value!r}.")
        self.posted = value

    @property
    def agreed(self) -> Optional[float]:
        """The ranks' sum of the previous run's posts; ``None`` before the first vote arrives."""
        return self._agreed

    def _set(self, value: Optional[float]) -> None:
        self._agreed = value


@dataclass(frozen=True)
class Agreement:
    """What a hook needs the ranks of a session to agree on (see :meth:`SessionRunHook.agreement`).

    A training session on several ranks votes once per run, with one small non-blocking
    collective, only when one of its hooks declares something; a session whose hooks
    declare nothing issues no collective of the library's at all.

    Attributes:
        stop: the hook may call ``run_context.request_stop()`` on some ranks only (its
            decision depends on this rank's data): every rank then stops one run later.
        time: the hook decides on time (:func:`lightning_finalops.hooks.timers.now`, a
            ``SecondOrStepTimer`` with seconds): every rank reads rank 0's clock.
        values: :class:`AgreedValue` s the hook posts and reads (summed over the ranks); a
            list is taken as a tuple.
        sigterm: a SIGTERM (a preemption) should stop the session at a step every rank
            agrees on, so that the hooks' ``end()`` runs there (``CheckpointSaverHook``
            asks for it: its final save then holds that step). The session's
            ``stop_on_sigterm`` argument overrides it.
    """

    stop: bool = False
    time: bool = False
    values: Tuple[AgreedValue, ...] = ()
    sigterm: bool = False

    def __post_init__(self) -> None:
        for name in ("stop", "time", "sigterm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Agreement({name}=...) must be a bool, got "
                                f"{type(getattr(self, name)).__name__}.")
        values = tuple(self.values) if isinstance(self.values, (list, tuple)) else None
        if values is None or not all(isinstance(v, AgreedValue) for v in values):
            raise TypeError("Agreement(values=...) must be a tuple of AgreedValue, got "
                            f"{self.values!r}.")
        object.__setattr__(self, "values", values)

    def __bool__(self) -> bool:
        return self.stop or self.time or bool(self.values) or self.sigterm


_NOTHING = Agreement()
_STOP = Agreement(stop=True)


class SessionRunHook:
    """Hook to extend calls to ``MonitoredSession.run()`` or a Lightning loop.

    Every method is a no-op by default; override the ones you need. A hook that keeps state
    which must survive a restart overrides ``state_dict``/``load_state_dict``; both adapters
    store it with the session's checkpoint under :attr:`state_key`.
    """

    def begin(self) -> None:
        """Called once before the session is created (before the model is on its device)."""

    def after_create_session(self, session: RawSession, coord: Coordinator) -> None:
        """Called when the session is ready: state restored, model on its device.

        Args:
            session: the raw session (runs on it trigger no hooks).
            coord: the session's coordinator.
        """

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Called before each run.

        Args:
            run_context: the run's context, shared by every hook of this run.

        Returns:
            ``None`` or a :class:`SessionRunArgs` with fetches to evaluate after the step,
            feeds to inject for the step, and options (for example a profiler trace).
        """
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Called after each run that succeeded, with this hook's evaluated fetches.

        Args:
            run_context: the same context object ``before_run`` received.
            run_values: ``results`` holds this hook's fetches, evaluated after the step.
        """

    def job_finished(self, global_step: int) -> bool:
        """Whether a job restored at ``global_step`` has nothing left to do for this hook.

        Asked once per session, after ``begin`` and the restore, before any
        ``after_create_session``. If any hook answers True the session is a finished job
        run again, and it creates no session (``Estimator.train``'s rule): no hook's
        ``after_create_session``, run or ``end`` happens, and one INFO line says so.
        ``StopAtStepHook(last_step=N)`` answers ``global_step >= N``; an early-stopping
        hook answers whether it was restored stopped. The base class answers False.
        """
        return False

    def agreement(self) -> Agreement:
        """What this hook needs the ranks of a session to agree on; asked once per session.

        With several ranks a training session votes once per run (one small non-blocking
        collective of the library's) when a hook declares something: stops requested on
        some ranks only, decisions on time, values to sum (:class:`Agreement`). The vote
        also carries a rank's departure or failure, so the other ranks stop with it instead
        of waiting. A session whose hooks declare nothing issues no collective.

        The default declares ``Agreement(stop=True)`` for a hook that overrides
        ``before_run`` or ``after_run`` (it may call ``request_stop()`` on one rank), and
        nothing otherwise. Override it to declare less (a hook that never stops, or stops
        with ``rank_consistent=True``) or more (time, values); the standard hooks do.
        """
        cls = type(self)
        if (cls.before_run is not SessionRunHook.before_run
                or cls.after_run is not SessionRunHook.after_run):
            return _STOP
        return _NOTHING

    @property
    def records_results(self) -> bool:
        """Whether this hook records named results at each session's end (an evaluation's).

        See :meth:`latest_results`; the base class records none.
        """
        return False

    def latest_results(self) -> Optional[Tuple[int, Mapping[str, Any]]]:
        """The latest ``(global_step, {name: value})`` this hook recorded at a session's end.

        What an evaluation produced (``Estimator.evaluate``'s dict): ``HookCallback`` keeps
        each evaluation session's new entries in its ``evaluation_history`` and logs their
        scalars, ``InMemoryEvaluatorHook`` merges them into its results, the early-stopping
        hooks read them from there. ``FinalOpsHook`` gives its latest entry when its final
        ops are a dict. A new session's entry must be a new object (the adapters tell new
        from old by identity). ``None``: nothing recorded (the base class).
        """
        return None

    def end(self, session: Optional[RawSession]) -> None:
        """Called once at the end of a session that ended cleanly (not after an exception).

        Args:
            session: the raw session; ``None`` when a closed ``MonitoredSession`` is closed again.
        """

    @property
    def state_key(self) -> str:
        """The key of this hook's state in a checkpoint (unique among the session's hooks).

        Two distinct stateful hooks with one key in one session are a ``ValueError`` when
        the session is built: override it (from the hook's configuration) to tell them apart.
        """
        return type(self).__qualname__

    def state_dict(self) -> Dict[str, Any]:
        """State that must survive a restart; the base class has none."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the base class accepts only ``{}``.

        Raises:
            ValueError: the base class was handed non-empty state.
        """
        if state_dict:
            raise ValueError(
                f"{type(self).__qualname__} keeps no state but load_state_dict() was given "
                f"keys {sorted(state_dict)}; override state_dict()/load_state_dict() to keep state."
            )


class SessionRunArgs(NamedTuple):
    """What a hook asks for in ``before_run``: fetches, feeds and run options.

    Attributes:
        fetches: a fetch structure (see the fetch rules in docs/concepts.md) or ``None``.
        feed_dict: ``{tensor: value}`` overrides a tensor for this run only;
            ``{"name": value}`` passes ``name=value`` to the step (and to fetched callables
            that accept it). ``None`` or ``{}`` for no feeds.
        options: a :class:`RunOptions` or ``None``.
    """

    fetches: Any
    feed_dict: Optional[Mapping[Any, Any]] = None
    options: Optional[RunOptions] = None


class SessionRunValues(NamedTuple):
    """What ``after_run`` receives.

    Attributes:
        results: this hook's fetches evaluated after the step (same structure), or ``None``.
        options: the merged :class:`RunOptions` of the run (one object for every hook).
        run_metadata: the run's :class:`RunMetadata` (one object for every hook).
    """

    results: Any
    options: RunOptions
    run_metadata: RunMetadata


class SessionRunContext:
    """The context of one run, shared by every hook's ``before_run`` and ``after_run``.

    Args:
        original_args: the user's ``SessionRunArgs(fetches, feed_dict)`` for this run.
        session: the raw session (runs on it trigger no hooks).
    """

    __slots__ = ("_original_args", "_session", "_stop_requested", "_consistent_stop")

    def __init__(self, original_args: SessionRunArgs, session: RawSession) -> None:
        self._original_args = original_args
        self._session = session
        self._stop_requested = False
        self._consistent_stop = False

    @property
    def original_args(self) -> SessionRunArgs:
        """The fetches and feeds the user passed to this run (options always ``None``)."""
        return self._original_args

    @property
    def session(self) -> RawSession:
        """The raw session: running fetches on it triggers no hooks."""
        return self._session

    @property
    def stop_requested(self) -> bool:
        """Whether a hook asked to stop in this run."""
        return self._stop_requested

    @property
    def rank_consistent_stop(self) -> bool:
        """Whether a hook asked to stop in this run with ``rank_consistent=True``."""
        return self._consistent_stop

    def request_stop(self, *, rank_consistent: bool = False) -> None:
        """Ask to stop after this run: the run completes and every ``after_run`` still fires.

        With one process the session stops after this run (TF's rule). With several ranks
        (a ``HookCallback`` training session under DDP) every rank must stop at the same
        step, or the others wait forever in their next collective, so a request is agreed:
        any rank's request stops every rank after the *next* run, through one small
        non-blocking all-reduce per run. A hook whose decision is already the same on every
        rank at this run passes ``rank_consistent=True`` and the stop applies after this
        run everywhere, as with one process.

        Args:
            rank_consistent: the hook asserts that every rank requests this stop in this
                run: the decision depends only on the global step, on values agreed across
                ranks (:func:`lightning_finalops.hooks.timers.now`, a torchmetrics
                ``compute()``), or on the same data. A request that is not in fact made on
                every rank leaves the others running into their next collective.
        """
        self._stop_requested = True
        if rank_consistent:
            self._consistent_stop = True


@dataclass(frozen=True)
class RunOptions:
    """Per-run options a hook may ask for; merged across hooks as TensorFlow merges them.

    ``trace_level`` takes the maximum over the user and every hook, the flags are OR-ed. A
    ``trace_level`` above :attr:`NO_TRACE` makes the engine record that run with
    ``torch.profiler`` (CPU activity; CUDA activity too from :attr:`HARDWARE_TRACE` on, when
    CUDA is available) and hand the profiler to every hook in ``run_metadata.profile``.
    Options are immutable: the merged options a run hands its hooks cannot be changed by
    one of them for the others or for later runs.

    Attributes:
        trace_level: one of ``NO_TRACE``, ``SOFTWARE_TRACE``, ``HARDWARE_TRACE``, ``FULL_TRACE``.
        profile_memory: record tensor allocations in the trace.
        record_shapes: record operator input shapes in the trace.
        with_stack: record Python stacks in the trace.
    """

    NO_TRACE: ClassVar[int] = 0
    SOFTWARE_TRACE: ClassVar[int] = 1
    HARDWARE_TRACE: ClassVar[int] = 2
    FULL_TRACE: ClassVar[int] = 3

    trace_level: int = 0
    profile_memory: bool = False
    record_shapes: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.trace_level) or self.trace_level not in (0, 1, 2, 3):
            raise ValueError(
                "RunOptions trace_level must be one of NO_TRACE (0), SOFTWARE_TRACE (1), "
                f"HARDWARE_TRACE (2) or FULL_TRACE (3), got {self.trace_level!r}."
            )
        for flag in ("profile_memory", "record_shapes", "with_stack"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise TypeError(
                    f"RunOptions {flag} must be a bool, got {type(value).__name__} ({value!r})."
                )

    def merged(self, other: RunOptions) -> RunOptions:
        """These options merged with ``other`` (max of levels, OR of flags), as a new object.

        Raises:
            TypeError: ``other`` is not a :class:`RunOptions`.
        """
        if not isinstance(other, RunOptions):
            raise TypeError(f"options must be a RunOptions, got {type(other).__name__}.")
        return RunOptions(
            trace_level=max(self.trace_level, other.trace_level),
            profile_memory=self.profile_memory or other.profile_memory,
            record_shapes=self.record_shapes or other.record_shapes,
            with_stack=self.with_stack or other.with_stack,
        )


class RunMetadata:
    """What the engine recorded during one run.

    Attributes:
        profile: the finished ``torch.profiler.profile`` of the run when a trace was asked
            for through :class:`RunOptions`, else ``None``. ``profile.export_chrome_trace(path)``
            writes a Chrome trace; torch allows that once per profile (a second call raises
            ``"Trace is already saved."``), and a :class:`ProfilerHook` on the same run
            already does it.
    """

    __slots__ = ("profile",)

    def __init__(self) -> None:
        self.profile: Any = None


class Coordinator:
    """A thread-safe stop flag shared by a session's hooks and threads (TF's ``Coordinator``).

    A thread that fails calls ``request_stop(exc)``; the session then reports
    ``should_stop()`` and re-raises ``exc`` when it closes, after every hook's ``end()``.
    Threads given to :meth:`register_thread` are joined when the session closes (TF's
    grace period, 120 s), so an exception one records while stopping is raised too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._exception: Optional[BaseException] = None
        self._threads: List[threading.Thread] = []

    def register_thread(self, thread: threading.Thread) -> None:
        """Have :meth:`join` (and so the session's close) wait for ``thread``.

        Raises:
            TypeError: ``thread`` is not a ``threading.Thread``.
        """
        if not isinstance(thread, threading.Thread):
            raise TypeError(f"thread must be a threading.Thread, got {type(thread).__name__}.")
        with self._lock:
            self._threads.append(thread)

    def running_threads(self) -> List[str]:
        """The names of the registered threads that are still running."""
        with self._lock:
            return [thread.name for thread in self._threads if thread.is_alive()]

    def join(self, threads: Optional[List[threading.Thread]] = None,
             stop_grace_period_secs: float = 120, ignore_live_threads: bool = False) -> None:
        """Wait for the registered threads (and ``threads``), then re-raise a recorded exception.

        Call it after :meth:`request_stop`. An exception a thread records while it stops is
        raised too: nothing a thread gave ``request_stop(exc)`` is dropped.

        Args:
            threads: more threads to wait for.
            stop_grace_period_secs: how long to wait for all of them together.
            ignore_live_threads: do not raise for threads still running after it.

        Raises:
            BaseException: the first exception given to :meth:`request_stop`.
            RuntimeError: threads were still running after the grace period (named).
        """
        with self._lock:
            waiting = list(self._threads) + list(threads or [])
        waiting = [thread for thread in waiting if thread.ident is not None]  # started ones
        deadline = time.monotonic() + stop_grace_period_secs
        for thread in waiting:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.raise_requested_exception()
        alive = [thread.name for thread in waiting if thread.is_alive()]
        if alive and not ignore_live_threads:
            raise RuntimeError(
                f"Coordinator stopped with threads still running after "
                f"{stop_grace_period_secs} s: {alive}."
            )

    def request_stop(self, ex: Optional[BaseException] = None) -> None:
        """Ask every participant to stop; the first exception given is kept for ``close()``.

        Args:
            ex: an exception that caused the stop, re-raised by :meth:`raise_requested_exception`.

        Raises:
            TypeError: ``ex`` is not an exception.
        """
        if ex is not None and not isinstance(ex, BaseException):
            raise TypeError(f"ex must be an exception or None, got {type(ex).__name__}.")
        with self._lock:
            if ex is not None and self._exception is None:
                self._exception = ex
            self._stop_event.set()

    def should_stop(self) -> bool:
        """Whether a stop was requested."""
        return self._stop_event.is_set()

    def wait_for_stop(self, timeout: Optional[float] = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass; return ``should_stop()``."""
        return self._stop_event.wait(timeout)

    def clear_stop(self) -> None:
        """Forget a stop request and its exception."""
        with self._lock:
            self._exception = None
            self._stop_event.clear()

    def raise_requested_exception(self) -> None:
        """Re-raise the exception given to :meth:`request_stop`, if any."""
        with self._lock:
            ex = self._exception
        if ex is not None:
            raise ex


class RawSession(abc.ABC):
    """The engine as a hook sees it: runs on it trigger no hooks.

    Both adapters implement it, so a hook written against it runs unchanged under
    ``MonitoredSession`` and under ``HookCallback``.
    """

    #: Whether this session's ranks take their decisions together (a training session on
    #: several ranks, set when the session is created): every rank runs every run with the
    #: same hooks, so a hook may start a collective at a step that every rank reaches.
    agrees_across_ranks: bool = False

    @abc.abstractmethod
    def run(self, fetches: Any, feed_dict: Optional[Mapping[Any, Any]] = None) -> Any:
        """Evaluate ``fetches`` now, without hooks, with ``feed_dict`` applied for this call."""

    @property
    @abc.abstractmethod
    def global_step(self) -> int:
        """The number of completed training runs."""

    @property
    def is_chief(self) -> bool:
        """Whether this process is the chief (global rank 0), which writes shared files."""
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:  # noqa: B027
        """Send scalars to the engine's loggers (Lightning's ``trainer.loggers`` on rank 0).

        A plain loop has no loggers: the default does nothing.
        """

    def save_checkpoint(
        self,
        path: str,
        on_written: Optional[Callable[[], Optional[bool]]] = None,
        *,
        only_if_changed: bool = False,
        asynchronous: bool = False,
    ) -> None:
        """Write a checkpoint that resumes the whole run to ``path``, atomically.

        Every rank calls it (a distributed engine may need all of them); the chief writes.
        Asked for from a hook, it is written once the step is final: after every hook's
        ``after_run`` of the run, after the validation that follows the batch (under
        Lightning, when one does), or after every hook's ``end()`` at the session's last
        step. So the file holds everything
        recorded at its step. Two requests for one path before it is written are one write.

        Args:
            path: the checkpoint's path.
            on_written: called right after the write (so it sees the file on disk); a
                truthy result asks the session to stop after the run it was written in
                (ignored at the session's creation and end).
            only_if_changed: asked for in ``end()`` for this step's file, already written
                with no run since: write it again only if the hooks' ``end()`` changed
                their state (a plain loop whose data ran out after a saving run).
            asynchronous: copy the state when the step is final and write it in the
                background while the loop goes on; at most one save is in flight, and the
                next save, the session's end and a failure wait for it (``on_written``
                fires then, once it is committed: the same step on every rank). An engine
                that cannot write in the background writes at once.

        Raises:
            NotImplementedError: the engine cannot write checkpoints.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write checkpoints.")

    def wait_for_save(self) -> bool:
        """Wait for a background save in flight (``asynchronous=True``); call its callback.

        Returns:
            Whether that callback asks to stop. The default has nothing in flight: False.

        Raises:
            Exception: what the background write raised (nothing was committed).
        """
        return False
