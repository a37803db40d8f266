"""The engine-neutral session core: one session of hooks over an engine, with TF's rules.

Two pieces, each imported by every adapter and importing none:

- :class:`Engine`, the short list of verbs an engine supplies (the global step, whether this
  process is the chief, the engine's named values, checkpoints, scalar logging, how its
  ranks agree). Hooks receive the engine as their raw session; the core implements its
  :meth:`~Engine.run` once, with one name-lookup order.
- :class:`HookedSession`, which owns a session from ``begin`` to ``end``: the hooks in list
  order at every call (nothing reversed), the merging of their ``before_run`` requests
  (fetches per hook, feeds with TF's conflict errors, run options), the run's protected
  region (tensor feeds applied and restored, the profiler trace), the evaluation of the
  hooks' fetches, ``after_run``, the stop flag and the hooks' state. An adapter translates
  its engine's events into these calls::

      session = HookedSession(hooks, engine)
      session.begin(); session.create()
      per run:  pending = session.start_run(fetches, feed_dict, options)
                <the engine runs the step, with pending.str_feeds passed on>
                session.finish_run(step_outputs)   # or session.abort_run() if the step raised
            or: outputs = session.run_step(step)   # all three, for a step callable alone
      session.end()                                # clean end only

Neither piece imports Lightning or an adapter.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lightning_finalops.distributed import RankAgreement
from lightning_finalops.fetches import (
    LazyNamespace,
    Namespace,
    TensorFeeds,
    check_fetches,
    check_str_feeds_accepted,
    evaluate,
    shares_memory,
    split_feeds,
    step_snapshot,
)
from lightning_finalops.hooks import timers
from lightning_finalops.session_run_hook import (
    Coordinator,
    RawSession,
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.validation import check_sequence_of

__all__ = [
    "Engine",
    "HookedSession",
    "check_hooks",
    "has_state",
    "hook_state_dict",
    "hook_state_keys",
    "load_hook_state_dict",
]

STOP_REQUESTED_MESSAGE = "Run called even after should_stop requested."
_EMPTY: Mapping[Any, Any] = types.MappingProxyType({})
_DEFAULT_OPTIONS = RunOptions()
# Builds a NamedTuple (SessionRunArgs, SessionRunValues) without its Python-level __new__:
# ``_new_tuple(SessionRunValues, (a, b, c))`` is ``SessionRunValues(a, b, c)``, one frame
# fewer on the path every run takes.
_new_tuple = tuple.__new__


class _NoTrace(RunMetadata):
    """The metadata of every run that asked for no trace: nothing recorded, read-only.

    One object serves all such runs (and every hook of each), so it cannot be written.
    """

    __slots__ = ()

    def __init__(self) -> None:
        object.__setattr__(self, "profile", None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            "run_metadata of a run without a trace is read-only; ask for a trace with "
            "SessionRunArgs(options=RunOptions(trace_level=...)) to get a profile in it."
        )

    def __reduce__(self) -> str:
        # copies and pickles (of a hook's saved run values) are the one shared object
        return "_NO_TRACE"


_NO_TRACE = _NoTrace()
# What every after_run of a run without results, options or trace receives: immutable, so
# one tuple serves every such run.
_NO_RESULTS = _new_tuple(SessionRunValues, (None, _DEFAULT_OPTIONS, _NO_TRACE))


class Engine(RawSession):
    """What an engine supplies to the session core; hooks receive it as their raw session.

    An engine implements :attr:`global_step` and overrides the other verbs where its
    defaults (one process, no loggers, no checkpoints, no named values) do not fit. It adds
    whatever hooks may need from it as plain attributes (``trainer`` and ``pl_module``
    under Lightning, ``modules`` in a plain loop). The core implements :meth:`run`.

    Names resolve in one order, in hook fetches and in :meth:`run` alike: the outputs of
    the step whose run is being finished (from the end of the step until the last
    ``after_run``), then the engine's :meth:`named_values`, then the outputs of the latest
    finished step. So a hook's fetch ``"loss"`` is this step's loss, and a
    ``FinalOpsHook`` at the end of a Lightning validation reads that validation's
    aggregated ``callback_metrics`` before the last batch's outputs.
    """

    #: Whether the engine passes str feeds as keyword arguments to the callables of the run
    #: (then each must be accepted by one of them), rather than by other means (Lightning
    #: sets them on the batch).
    str_feeds_as_keywords: bool = True

    #: Whether the ranks may run different hooks (a plain loop's chief-only hooks): then a
    #: session agrees at every run even when this rank's hooks have no per-run method.
    ranks_may_differ_in_hooks: bool = False

    # The latest checkpoint save_checkpoint wrote: (path, global step).
    _saved: Optional[Tuple[str, int, int]] = None
    # Runs finished by sessions on this engine: the core counts a run once its step and the
    # hooks' fetches succeeded, before its after_runs (an engine that counts its global
    # step by runs, a plain loop, reads it).
    _runs = 0

    # Set by the session core only: the latest step's outputs and whether they are fresh.
    _step_outputs: Mapping[str, Any] = _EMPTY
    _step_outputs_fresh: bool = False

    def named_values(self) -> Mapping[str, Any]:
        """Values the engine names beyond the step's outputs (``callback_metrics``).

        Read only when a name is not among the fresh step outputs.
        """
        return _EMPTY

    def save_checkpoint(self, path: str) -> None:
        """Write a checkpoint through :meth:`write_checkpoint` and remember it.

        The core writes it again when hooks record more at the same global step (see
        :meth:`refresh_checkpoint`).
        """
        self.write_checkpoint(path)
        self._saved = (path, self.global_step, self._runs)

    def write_checkpoint(self, path: str) -> None:
        """Write a checkpoint that resumes the whole run to ``path``, atomically.

        Every rank calls it; what each writes is the engine's business.

        Raises:
            NotImplementedError: the engine cannot write checkpoints.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write checkpoints.")

    def refresh_checkpoint(self) -> None:
        """Write the checkpoint saved at the current global step again, if there is one.

        Hooks may record more at a step after its checkpoint was written (a
        ``FinalOpsHook`` at the end of the session, a validation that Lightning runs after
        the batch that saved); writing it again puts that in, so a resume from it loses
        nothing. Every rank calls it at the same point.
        """
        saved = self._saved
        # the same step and no run since: a run that did not advance the global step
        # (gradient accumulation) moved the loop on, and the old position must stay
        if saved is not None and saved[1:] == (self.global_step, self._runs):
            self.write_checkpoint(saved[0])

    def step_completed(self) -> None:
        """The step and the hooks' fetches of a run succeeded; its ``after_run`` s come next.

        Optional: the core calls it only when an engine overrides it (an engine that counts
        its global step itself). The core counts runs in ``_runs`` before this call; the
        plain loop's engine reads its global step from that count instead.
        """

    def rank_agreement(self) -> Optional[RankAgreement]:
        """How the ranks of a training session agree (stops, time), or ``None``: one process.

        Called once per session, at its creation, by every rank.
        """
        return None

    def namespaces(self) -> Tuple[Namespace, ...]:
        """Where names resolve now, first match wins (see the class docstring)."""
        named = LazyNamespace(self.named_values)
        if self._step_outputs_fresh:
            return (self._step_outputs, named)
        return (named, self._step_outputs)

    def run(self, fetches: Any, feed_dict: Optional[Mapping[Any, Any]] = None) -> Any:
        """Evaluate ``fetches`` now, without hooks, with ``feed_dict`` applied for this call.

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


def check_hooks(hooks: Any, argument: str) -> Tuple[SessionRunHook, ...]:
    """Return ``hooks`` as a tuple after checking every item is a distinct hook.

    Raises:
        TypeError: ``hooks`` is not an iterable of hooks (the message names the position).
        ValueError: one hook object is listed twice (it would run twice per call).
    """
    checked = tuple(check_sequence_of(hooks, SessionRunHook, argument))
    first: Dict[int, int] = {}
    for i, hook in enumerate(checked):
        j = first.setdefault(id(hook), i)
        if j != i:
            raise ValueError(
                f"{argument}[{i}] is the same {_hook_name(hook)} object as {argument}[{j}]: "
                "it would run twice at every call. List it once."
            )
    return checked


def _hook_name(hook: SessionRunHook) -> str:
    return type(hook).__name__


def _overrides(hook: SessionRunHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(SessionRunHook, method)


def has_state(hook: SessionRunHook) -> bool:
    """Whether ``hook`` overrides :meth:`SessionRunHook.state_dict` (the base is stateless)."""
    return type(hook).state_dict is not SessionRunHook.state_dict


def _stateful(hooks: Sequence[SessionRunHook]) -> Tuple[List[str], List[SessionRunHook]]:
    """The distinct stateful hooks in list order and their unique keys.

    A hook listed twice (in a training and an evaluation list) has one state. Keys are each
    hook's ``state_key``, with ``#1``, ``#2``... appended to repeats.
    """
    distinct: Dict[int, SessionRunHook] = {}
    for hook in hooks:
        if has_state(hook):
            distinct.setdefault(id(hook), hook)
    keys: List[str] = []
    counts: Dict[str, int] = {}
    for hook in distinct.values():
        key = hook.state_key
        if not isinstance(key, str) or not key:
            raise TypeError(f"{_hook_name(hook)}.state_key must be a non-empty str, got {key!r}.")
        n = counts.get(key, 0)
        counts[key] = n + 1
        keys.append(key if n == 0 else f"{key}#{n}")
    return keys, list(distinct.values())


def _is_empty(state: Any) -> bool:
    # what the base class's state_dict() returns; anything else is state to keep
    return isinstance(state, Mapping) and len(state) == 0


def hook_state_keys(hooks: Sequence[SessionRunHook]) -> List[str]:
    """The keys :func:`hook_state_dict` stores the distinct stateful hooks of ``hooks`` under."""
    return _stateful(hooks)[0]


def hook_state_dict(hooks: Sequence[SessionRunHook]) -> Dict[str, Dict[str, Any]]:
    """``{key: state}`` of the distinct stateful hooks of ``hooks``; both adapters use it.

    Stateless hooks have no key, so adding, removing or moving one never changes the keys.
    """
    keys, stateful = _stateful(hooks)
    return {key: hook.state_dict() for key, hook in zip(keys, stateful)}


def load_hook_state_dict(
    hooks: Sequence[SessionRunHook], state: Any, strict: bool = True
) -> None:
    """Give each stateful hook of ``hooks`` what :func:`hook_state_dict` saved under its key.

    A hook without saved state keeps its own (it was added since the save); saved empty
    states match anything.

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: with ``strict``, a saved non-empty state has no hook to go to (it would
            be lost).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"hook state must be a mapping, got {type(state).__name__}.")
    keys, stateful = _stateful(hooks)
    if strict:
        unexpected = sorted(
            key for key, value in state.items() if key not in keys and not _is_empty(value)
        )
        if unexpected:
            raise ValueError(
                "The saved hook state does not match the session's hooks: saved state of "
                f"{unexpected} has no hook here (the session's stateful hooks: {keys}). Keys "
                "are each stateful hook's state_key in list order ('#1' for a repeat); build "
                "the session with the same hooks, or pass strict=False to drop that state."
            )
    for key, hook in zip(keys, stateful):
        if key in state:
            hook.load_state_dict(state[key])


def _raise_if_feeds_intersect(
    feeds_a: Mapping[Any, Any], feeds_b: Mapping[Any, Any], message: str
) -> None:
    # dict membership compares tensors by identity and strings by value, as TF's key sets
    # do; beyond TF, a tensor and a view of it are the same memory, so they conflict too
    tensors_a = [key for key in feeds_a if isinstance(key, torch.Tensor)]
    intersection = [
        key
        for key in feeds_b
        if key in feeds_a
        or (isinstance(key, torch.Tensor) and any(shares_memory(key, t) for t in tensors_a))
    ]
    if intersection:
        raise RuntimeError(message + " Conflict(s): " + str(intersection))


class PendingRun:
    """One run between ``start_run`` and ``finish_run``: what the hooks asked for.

    A run with nothing of its own to record (no user feeds or options, no hook request)
    is its session's one reused plain record, valid until that run finishes or aborts.

    Attributes:
        context: the :class:`SessionRunContext` shared by every hook of the run.
        options: the merged :class:`RunOptions` (immutable; the user's object is kept).
        run_metadata: the run's :class:`RunMetadata`.
        tensor_feeds: ``{tensor: value}`` from the hooks and the user, merged.
        str_feeds: ``{name: value}`` from the hooks and the user, merged; the engine passes
            them to the step.
        hook_fetches: ``[(hook index, fetches)]`` for the hooks that asked for fetches.
    """

    __slots__ = (
        "context", "options", "run_metadata", "tensor_feeds", "str_feeds", "hook_fetches",
        "_hook_feeds", "_applied", "_trace",
    )

    def __init__(self, context: Optional[SessionRunContext], options: RunOptions) -> None:
        self.context = context
        self.options = options
        self.run_metadata: RunMetadata = _NO_TRACE  # a trace gets a RunMetadata of its own
        # Read-only empty defaults, replaced on the first request: most runs ask for nothing.
        self.tensor_feeds: Mapping[torch.Tensor, Any] = _EMPTY
        self.str_feeds: Mapping[str, Any] = _EMPTY
        self.hook_fetches: Sequence[Tuple[int, Any]] = ()
        self._hook_feeds: Optional[Dict[Any, Any]] = None  # gathered in the hooks' order
        self._applied: Optional[TensorFeeds] = None
        self._trace: Any = None

    @property
    def wants_trace(self) -> bool:
        """Whether a hook or the user asked for a profiler trace of this run."""
        return self.options.trace_level > RunOptions.NO_TRACE

    @property
    def entered(self) -> bool:
        """Whether feeds are applied or a trace runs: :meth:`exit` has something to undo."""
        return self._applied is not None or self._trace is not None

    def enter(self) -> None:
        """Apply the tensor feeds, then start the trace (the run's protected region)."""
        try:
            if self.tensor_feeds:
                self._applied = TensorFeeds(self.tensor_feeds)
                self._applied.apply()
            if self.wants_trace:
                self._trace = trace_run(self)
                self._trace.__enter__()
        except BaseException:
            self.exit()
            raise

    def exit(self) -> None:
        """Stop the trace, then restore the fed tensors; safe to call again."""
        trace, self._trace = self._trace, None
        applied, self._applied = self._applied, None
        try:
            if trace is not None:
                trace.__exit__(None, None, None)
        finally:
            if applied is not None:
                applied.restore()


# The run of a session whose hooks have no per-run methods, when the user asks for nothing
# either: no hook sees it, so one shared, empty object serves every such run.
_IDLE_RUN = PendingRun(None, _DEFAULT_OPTIONS)
# What marks a run in flight while HookedSession.run_step runs a step that no hook asked
# anything of: that run's context and metadata are run_step's own, as no one else needs them.
_LOCAL_RUN = PendingRun(None, _DEFAULT_OPTIONS)
_IN_FLIGHT_MESSAGE = "start_run() called while a run is in flight; finish or abort it."


def trace_run(pending: PendingRun) -> Any:
    """A ``torch.profiler.profile`` of the run, as its merged options ask for.

    It is handed to every hook as ``run_metadata.profile``. CPU activity always; CUDA
    activity too from ``HARDWARE_TRACE`` on, when CUDA is available.
    """
    options = pending.options
    activities = [torch.profiler.ProfilerActivity.CPU]
    if options.trace_level >= RunOptions.HARDWARE_TRACE and torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profile = torch.profiler.profile(
        activities=activities,
        record_shapes=options.record_shapes,
        profile_memory=options.profile_memory,
        with_stack=options.with_stack,
    )
    pending.run_metadata = metadata = RunMetadata()
    metadata.profile = profile
    return profile


class HookedSession:
    """One session of a fixed list of hooks over an engine, with TensorFlow's rules.

    Each hook's ``before_run``/``after_run`` is looked up once, here (bound methods, and only
    the ones a hook overrides): replacing them on a hook later has no effect on this session.

    A run's protected region covers the step and the evaluation of the hooks' fetches: the
    tensor feeds are applied and the profiler trace started at the end of
    :meth:`start_run`, and both are undone (trace stopped, feeds restored in reverse order)
    before the first ``after_run``, or by :meth:`abort_run` when the step raised.

    Args:
        hooks: the session's hooks, called in this order at every point.
        engine: the engine the session runs on; hooks receive it as their raw session.
        argument: the argument name the hooks came from, for error messages.
        agree_across_ranks: agree on stops and time through ``engine.rank_agreement()``
            (training sessions, whose ranks all run the same steps). Evaluation and
            prediction sessions, whose ranks may see different numbers of batches, agree on
            nothing: no rank could wait for a vote another rank never sends. Every rank
            must then have hooks with the same per-run methods: a session whose hooks have
            none sends no vote at all.

    Raises:
        TypeError: an item of ``hooks`` is not a :class:`SessionRunHook`.
    """

    def __init__(
        self,
        hooks: Any,
        engine: Engine,
        argument: str = "hooks",
        *,
        agree_across_ranks: bool = False,
    ) -> None:
        self.hooks = check_hooks(hooks, argument)
        _stateful(self.hooks)  # a bad state_key fails here, not at the first checkpoint
        self.engine = engine
        self.coord = Coordinator()
        # Bound methods, looked up once, of the hooks that override them: these loops run
        # at every step, and skipping the base class's empty methods is invisible to hooks.
        self._before = [
            (i, h, h.before_run) for i, h in enumerate(self.hooks) if _overrides(h, "before_run")
        ]
        self._after = [
            (i, h.after_run) for i, h in enumerate(self.hooks) if _overrides(h, "after_run")
        ]
        self._after_calls = [after_run for _, after_run in self._after]
        # called after each counted run only when the engine overrides it (most do not)
        self._step_completed = (
            engine.step_completed
            if type(engine).step_completed is not Engine.step_completed else None
        )
        #: no hook overrides ``before_run`` or ``after_run``: a run needs no hook calls
        self.idle_per_run = not self._before and not self._after
        self.should_stop = False
        self.created = False
        #: a hook stopped the session at its creation (``StopAtStepHook`` restored at or past
        #: its last step: a finished job run again); with no run since, it is no session
        self.finished_at_creation = False
        #: runs this session finished
        self.runs = 0
        self._run: Optional[PendingRun] = None
        # The record of every run that has nothing of its own to record (no feeds, options or
        # requests: most runs), reused: start_run gives it each run's context and metadata.
        self._plain_run = PendingRun(None, _DEFAULT_OPTIONS)
        # A session whose hooks act only at its start and end can neither stop nor trigger
        # on time: it needs no agreement, so no collective at all.
        self._agree = agree_across_ranks and (
            not self.idle_per_run or engine.ranks_may_differ_in_hooks
        )
        self._agreement: Optional[RankAgreement] = None
        self._time_before: Optional[float] = None

    # -- session lifecycle -------------------------------------------------------------------
    def begin(self) -> None:
        """Call every hook's ``begin()`` in order."""
        for hook in self.hooks:
            hook.begin()

    def create(self) -> None:
        """Call every hook's ``after_create_session(engine, coord)`` in order, once."""
        if self.created:
            return
        self.created = True
        if self._agree:
            self._agreement = self.engine.rank_agreement()
            self.engine.agrees_across_ranks = self._agreement is not None
            if self._agreement is not None:
                # restored when the session ends: an enclosing session's agreed time
                self._time_before = timers.agreed_time()
                timers.set_agreed_time(self._agreement.start(timers.clock()))
        for hook in self.hooks:
            hook.after_create_session(self.engine, self.coord)
        self.finished_at_creation = self.coord.should_stop()

    def end(self, *, closed: bool = False) -> None:
        """Call every hook's ``end(engine)`` in order; an exception skips the later hooks.

        A session that was never created is created first (an engine that skipped its
        creation point). With ``closed`` (a closed session closed again, as TF) the hooks
        get ``end(None)``.
        """
        self.create()
        session = None if closed else self.engine
        try:
            for hook in self.hooks:
                hook.end(session)
        except BaseException:
            self.abandon()  # the other ranks' last vote is not waited for, the clock restored
            raise
        if self._agreement is not None:
            self._agreement.close()
            self._leave_agreement()

    @property
    def is_finished_job(self) -> bool:
        """Stopped at its creation and ran nothing: a finished job restored and run again."""
        return self.finished_at_creation and self.runs == 0

    def abandon(self) -> None:
        """The session ends by an exception: leave the run and the agreement, no ``end()``."""
        self.abort_run()
        if self._agreement is not None:
            self._agreement.abandon()
            self._leave_agreement()

    def _leave_agreement(self) -> None:
        self._agreement = None
        timers.set_agreed_time(self._time_before)

    # -- one run ---------------------------------------------------------------------------
    @property
    def in_run(self) -> bool:
        """Whether a run was started and neither finished nor aborted."""
        return self._run is not None

    def start_run(
        self,
        fetches: Any = None,
        feed_dict: Optional[Mapping[Any, Any]] = None,
        options: Optional[RunOptions] = None,
        *,
        replace: bool = False,
    ) -> PendingRun:
        """Call every hook's ``before_run`` in order, merge their requests, enter the run.

        Args:
            fetches: the user's fetches (for ``run_context.original_args``).
            feed_dict: the user's feeds.
            options: the user's run options.
            replace: abort a run still in flight (one its engine never finished) rather
                than raise.

        Returns:
            The :class:`PendingRun`; the engine runs the step with its ``str_feeds``.

        Raises:
            RuntimeError: a stop was requested earlier, a run is already in flight, or two
                feeds conflict (TF's texts).
            TypeError: a hook returned something else than ``SessionRunArgs``/``None``, or
                asked for an invalid fetch or feed.
            ValueError: a str feed that no callable of the run accepts (with
                ``str_feeds_as_keywords``), or a tensor feed of the wrong shape.
        """
        if replace and self._run is not None:
            self.abort_run()
        if self.should_stop:
            raise RuntimeError(STOP_REQUESTED_MESSAGE)
        if self._run is not None:
            raise RuntimeError(_IN_FLIGHT_MESSAGE)
        if options is not None and not isinstance(options, RunOptions):
            raise TypeError(f"options must be a RunOptions or None, got {type(options).__name__}.")
        if self.idle_per_run and feed_dict is None and options is None:
            self._run = _IDLE_RUN
            return _IDLE_RUN
        context = SessionRunContext(
            _new_tuple(SessionRunArgs, (fetches, feed_dict, None)), self.engine
        )
        # A run gets a PendingRun of its own once it has something to record (the user's
        # feeds or options, a hook's request); until then it is the session's plain run.
        pending = (
            PendingRun(context, options or _DEFAULT_OPTIONS)
            if feed_dict or options is not None else None
        )
        for i, hook, before_run in self._before:
            request = before_run(context)
            if request is not None:
                if pending is None:
                    pending = PendingRun(context, _DEFAULT_OPTIONS)
                self._add_request(pending, i, hook, request)
        if pending is None:  # the usual run: nothing to merge or enter
            pending = self._plain_run
            pending.context = context
            self._run = pending
        else:
            self._enter(pending, fetches, feed_dict)
        return pending

    def run_step(self, step: Callable[..., Any]) -> Any:
        """A whole run whose one fetch is ``step``, with no feeds or options: a plain loop's run.

        The same as :meth:`start_run` with ``step`` as the fetch, then ``step`` called (with
        the run's str feeds it accepts, when hooks feed some), then :meth:`finish_run` with
        what it returned (:meth:`abort_run` if it raised), in one call: every step of a plain
        loop takes this path, so a run that no hook asks anything of is started and finished
        here, inline, as :meth:`finish_run` finishes the session's plain run.

        Args:
            step: the step callable (not a metric).

        Returns:
            What ``step`` returned, detached (:func:`~lightning_finalops.fetches.step_snapshot`;
            with str feeds, evaluated as a fetch).

        Raises:
            RuntimeError: a stop was requested earlier, or a run is already in flight.
            BaseException: whatever the step, a hook or a hook's fetch raised (see
                :meth:`start_run` and :meth:`finish_run`).
        """
        if self._agreement is not None:  # the ranks vote at every run: the general path
            return self._finish_step(step, self.start_run(step))
        if self.should_stop:
            raise RuntimeError(STOP_REQUESTED_MESSAGE)
        if self._run is not None:
            raise RuntimeError(_IN_FLIGHT_MESSAGE)
        engine = self.engine
        if self.idle_per_run:  # no hook acts per run: finish_run's idle run, inline
            self._run = _IDLE_RUN
            try:
                outputs = step_snapshot(step())
            finally:
                self._run = None
            engine._step_outputs = (
                outputs if type(outputs) is dict or isinstance(outputs, Mapping) else _EMPTY
            )
            engine._runs += 1
            self.runs += 1
            if self._step_completed is not None:
                self._step_completed()
            return outputs
        context = SessionRunContext(_new_tuple(SessionRunArgs, (step, None, None)), engine)
        pending: Optional[PendingRun] = None
        for i, hook, before_run in self._before:
            request = before_run(context)
            if request is not None:
                if pending is None:
                    pending = PendingRun(context, _DEFAULT_OPTIONS)
                self._add_request(pending, i, hook, request)
        if pending is not None:  # a hook asked for something: the general path from here
            self._enter(pending, step, None)
            return self._finish_step(step, pending)
        # No request: what finish_run does with the session's plain run, inline.
        self._run = _LOCAL_RUN
        try:
            outputs = step_snapshot(step())
        except BaseException:
            self._run = None
            raise
        engine._step_outputs = (
            outputs if type(outputs) is dict or isinstance(outputs, Mapping) else _EMPTY
        )
        engine._step_outputs_fresh = True
        try:
            engine._runs += 1
            self.runs += 1
            if self._step_completed is not None:
                self._step_completed()
            for after_run in self._after_calls:
                after_run(context, _NO_RESULTS)
            self.should_stop = self.should_stop or context._stop_requested
        finally:
            engine._step_outputs_fresh = False
            self._run = None
        return outputs

    def _finish_step(self, step: Callable[..., Any], pending: PendingRun) -> Any:
        """Call ``step`` in the started run ``pending``, then finish the run (abort on error)."""
        try:
            if pending.str_feeds:
                outputs = evaluate(step, self.engine.namespaces(), pending.str_feeds)
            else:
                outputs = step_snapshot(step())
        except BaseException:
            self.abort_run()
            raise
        self.finish_run(outputs)
        return outputs

    def _add_request(
        self, pending: PendingRun, i: int, hook: SessionRunHook, request: Any
    ) -> None:
        """Check what hook ``i`` returned from ``before_run`` and add it to the run's requests.

        Raises:
            TypeError: ``request`` is not a ``SessionRunArgs``, or holds an invalid fetch or
                feed key.
            RuntimeError: it feeds a tensor another hook of the run feeds.
        """
        if not isinstance(request, SessionRunArgs):
            raise TypeError(
                f"{_hook_name(hook)}.before_run must return a SessionRunArgs or None, "
                f"got {type(request).__name__}."
            )
        if request.fetches is not None:
            check_fetches(request.fetches, f"{_hook_name(hook)}.before_run fetches")
            pending.hook_fetches = [*pending.hook_fetches, (i, request.fetches)]
        if request.feed_dict:
            split_feeds(request.feed_dict, f"{_hook_name(hook)}.before_run feed_dict")
            if pending._hook_feeds is None:
                pending._hook_feeds = {}
            _raise_if_feeds_intersect(
                pending._hook_feeds, request.feed_dict, "Same tensor is fed by two hooks."
            )
            pending._hook_feeds.update(request.feed_dict)
        if request.options:
            pending.options = pending.options.merged(request.options)

    def _enter(self, pending: PendingRun, fetches: Any,
               feed_dict: Optional[Mapping[Any, Any]]) -> None:
        """Merge the user's and the hooks' feeds, enter the run's protected region, start it.

        Raises:
            RuntimeError: the user and a hook feed the same tensor.
            ValueError: a str feed that no callable of the run accepts (with
                ``str_feeds_as_keywords``), or a tensor feed of the wrong shape.
        """
        hook_feeds = pending._hook_feeds
        if feed_dict or hook_feeds:
            tensor_feeds, str_feeds = split_feeds(feed_dict, "feed_dict")
            if hook_feeds:
                if feed_dict:
                    _raise_if_feeds_intersect(
                        feed_dict, hook_feeds, "Same tensor is fed by a SessionRunHook and user."
                    )
                hook_tensor_feeds, hook_str_feeds = split_feeds(hook_feeds, "feed_dict")
                tensor_feeds = {**hook_tensor_feeds, **tensor_feeds}
                str_feeds = {**hook_str_feeds, **str_feeds}
            pending.tensor_feeds = tensor_feeds
            pending.str_feeds = str_feeds
            if str_feeds and self.engine.str_feeds_as_keywords:
                check_str_feeds_accepted(
                    str_feeds, fetches, [f for _, f in pending.hook_fetches]
                )
        if pending.tensor_feeds or pending.options.trace_level:
            pending.enter()
        self._run = pending

    def finish_run(self, outputs: Any, *, missing_ok: bool = False) -> bool:
        """The step ran: evaluate the hooks' fetches, leave the run, call every ``after_run``.

        The hooks' fetches are evaluated against ``outputs`` (when it is a mapping), then
        the engine's named values; then the run is counted (``engine._runs``). An exception
        in a fetch or in an ``after_run`` skips the later hooks and propagates; the stop flag
        is then not applied (TF's rule), and a failed fetch leaves the run uncounted.

        Args:
            outputs: what the step returned (a dict makes its keys fetchable by name).
            missing_ok: with no run in flight (its engine skipped its start), return
                ``False`` rather than raise.

        Returns:
            Whether the session should stop, agreed across ranks through the engine.
        """
        pending = self._run
        if pending is None:
            if missing_ok:
                return False
            raise RuntimeError("finish_run() called without a run in flight.")
        engine = self.engine
        if pending is self._plain_run and self._agreement is None:
            # The usual run, with nothing to evaluate or undo: the steps below, fewer checks
            # (run_step finishes such a run of a plain loop the same way, inline).
            engine._step_outputs = (
                outputs if type(outputs) is dict or isinstance(outputs, Mapping) else _EMPTY
            )
            engine._step_outputs_fresh = True
            try:
                engine._runs += 1
                self.runs += 1
                if self._step_completed is not None:
                    self._step_completed()
                context = pending.context
                for after_run in self._after_calls:
                    after_run(context, _NO_RESULTS)
                self.should_stop = self.should_stop or context._stop_requested
            finally:
                engine._step_outputs_fresh = False
                self._run = None
                pending.context = None  # the session keeps no run's fetches (the step)
            return self.should_stop
        previous_outputs = engine._step_outputs
        engine._step_outputs = (
            outputs if type(outputs) is dict or isinstance(outputs, Mapping) else _EMPTY
        )
        if pending is _IDLE_RUN:
            self._run = None
            engine._runs += 1
            self.runs += 1
            if self._step_completed is not None:
                self._step_completed()
            if self._agreement is not None:  # ranks whose hooks differ: the vote goes on
                agreed_stop = self._receive_agreement()
                self._agreement.send(False, timers.clock())
                self.should_stop = self.should_stop or agreed_stop
            return self.should_stop
        engine._step_outputs_fresh = True
        try:
            try:
                results = self._evaluate_hook_fetches(pending) if pending.hook_fetches else None
            except BaseException:
                engine._step_outputs = previous_outputs  # a failed run names nothing
                raise
            finally:
                if pending._applied is not None or pending._trace is not None:
                    pending.exit()
            engine._runs += 1
            self.runs += 1
            if self._step_completed is not None:
                self._step_completed()
            context = pending.context
            assert context is not None
            agreement = self._agreement
            agreed_stop = self._receive_agreement() if agreement is not None else False
            no_results = _new_tuple(
                SessionRunValues, (None, pending.options, pending.run_metadata)
            )
            if not results:
                for after_run in self._after_calls:
                    after_run(context, no_results)
            else:
                for i, after_run in self._after:
                    if i in results:
                        values = SessionRunValues(results[i], pending.options,
                                                  pending.run_metadata)
                        after_run(context, values)
                    else:
                        after_run(context, no_results)
            if agreement is None:
                # the flag itself, not the property: one call fewer per run
                self.should_stop = self.should_stop or context._stop_requested
            else:
                # A request made in this run reaches the other ranks with this vote and
                # stops every rank after the next run; a rank-consistent one applies now.
                consistent = context.rank_consistent_stop
                agreement.send(context.stop_requested and not consistent, timers.clock())
                self.should_stop = self.should_stop or agreed_stop or consistent
        finally:
            engine._step_outputs_fresh = False
            self._run = None
            if pending is self._plain_run:
                pending.context = None
        return self.should_stop

    def _receive_agreement(self) -> bool:
        """Read what the ranks agreed at the previous run; return whether any asked to stop."""
        assert self._agreement is not None
        agreed = self._agreement.receive()
        if agreed is None:
            return False
        agreed_stop, agreed_time = agreed
        timers.set_agreed_time(agreed_time)
        return agreed_stop

    def abort_run(self) -> None:
        """The step raised (or never finished): leave the run without any ``after_run``."""
        pending, self._run = self._run, None
        self.engine._step_outputs_fresh = False
        if pending is self._plain_run:
            pending.context = None
        elif pending is not None and pending.entered:
            pending.exit()

    def _evaluate_hook_fetches(self, pending: PendingRun) -> Dict[int, Any]:
        namespaces = self.engine.namespaces()
        return {
            i: evaluate(
                fetches, namespaces, pending.str_feeds,
                f"{_hook_name(self.hooks[i])}.before_run fetches",
            )
            for i, fetches in pending.hook_fetches
        }

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Every stateful hook's ``state_dict()`` under its unique key."""
        return hook_state_dict(self.hooks)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Give each stateful hook the state saved under its key.

        Args:
            state: what :meth:`state_dict` returned.
            strict: raise if saved non-empty state has no hook; else drop it.

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: with ``strict``, a saved non-empty state has no hook to go to. A
                hook without saved state keeps its own (it was added since the save), and
                empty states match anything: adding or removing a stateless hook, or adding
                a stateful one, never breaks a resume.
        """
        load_hook_state_dict(self.hooks, state, strict)
