"""The engine-neutral hook runner: TensorFlow's ``_HookedSession`` rules, for both adapters.

It owns the ordering (hooks in list order at every call, nothing reversed), the merging of
hook requests (fetches per hook, feeds with TF's conflict errors, run options), the stop flag
(applied after every ``after_run`` of the run), and hook state. An adapter drives it:

```
runner.begin(); runner.after_create_session(raw, coord)
per run:  pending = runner.before_run(raw, fetches, feed_dict, options)
          <the engine runs the step with pending.tensor_feeds / pending.str_feeds applied>
          runner.evaluate(pending, namespaces)       # hook fetches, against the step's results
          runner.after_run(pending)
runner.end(raw)                                    # clean end only
```
It imports neither Lightning nor an adapter.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lightning_finalops.fetches import check_fetches, evaluate, split_feeds
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

STOP_REQUESTED_MESSAGE = "Run called even after should_stop requested."
_NO_FEEDS: Mapping[Any, Any] = types.MappingProxyType({})


def _hook_name(hook: SessionRunHook) -> str:
    return type(hook).__name__


def _overrides(hook: SessionRunHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(SessionRunHook, method)


def check_hooks(hooks: Any, argument: str) -> Tuple[SessionRunHook, ...]:
    """Return ``hooks`` as a tuple after checking every item is a :class:`SessionRunHook`.

    Raises:
        TypeError: ``hooks`` is not an iterable of hooks (the message names the position).
    """
    if hooks is None:
        return ()
    if isinstance(hooks, (SessionRunHook, str, Mapping)) or not hasattr(hooks, "__iter__"):
        raise TypeError(
            f"{argument} must be a list of SessionRunHook, got {type(hooks).__name__}."
        )
    hooks = tuple(hooks)
    for i, hook in enumerate(hooks):
        if not isinstance(hook, SessionRunHook):
            raise TypeError(
                f"{argument}[{i}] must be a SessionRunHook, got {type(hook).__name__} ({hook!r})."
            )
    return hooks


def state_keys(hooks: Sequence[SessionRunHook]) -> List[str]:
    """Stable, unique keys for hook state: ``state_key``, then ``#1``, ``#2``... for repeats."""
    keys: List[str] = []
    counts: Dict[str, int] = {}
    for hook in hooks:
        key = hook.state_key
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"{_hook_name(hook)}.state_key must be a non-empty str, got {key!r}."
            )
        n = counts.get(key, 0)
        counts[key] = n + 1
        keys.append(key if n == 0 else f"{key}#{n}")
    return keys


def has_state(hook: SessionRunHook) -> bool:
    """Whether ``hook`` overrides :meth:`SessionRunHook.state_dict` (the base is stateless)."""
    return type(hook).state_dict is not SessionRunHook.state_dict


def load_hook_states(
    hooks: Sequence[SessionRunHook], keys: Sequence[str], state: Any, strict: bool = True
) -> None:
    """Give each hook the state saved under its key (see :meth:`HookRunner.load_state_dict`).

    A hook without saved state keeps its own (a hook added since the save starts fresh);
    saved empty states match anything, so a stateless hook added or removed never breaks a
    resume.

    Raises:
        TypeError: ``state`` is not a mapping.
        ValueError: with ``strict``, a saved non-empty state has no hook to go to (it would
            be lost).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"hook state must be a mapping, got {type(state).__name__}.")
    if strict:
        unexpected = sorted(key for key, value in state.items() if key not in keys and value != {})
        if unexpected:
            raise ValueError(
                "The saved hook state does not match the session's hooks: saved state of "
                f"{unexpected} has no hook here (the session's hooks: {list(keys)}). Keys are "
                "each hook's state_key in list order ('#1' for a repeat); build the session "
                "with the same hooks, or pass strict=False to drop that state."
            )
    for key, hook in zip(keys, hooks):
        if key in state:
            hook.load_state_dict(state[key])


def _raise_if_feeds_intersect(
    feeds_a: Mapping[Any, Any], feeds_b: Mapping[Any, Any], message: str
) -> None:
    # dict membership compares tensors by identity and strings by value, as TF's key sets do
    intersection = [key for key in feeds_b if key in feeds_a]
    if intersection:
        raise RuntimeError(message + " Conflict(s): " + str(intersection))


_NO_FETCHES: List[Tuple[int, Any]] = []  # never appended to: PendingRun replaces it
_NO_RESULTS: Dict[int, Any] = {}


class PendingRun:
    """One run between ``before_run`` and ``after_run``: what the hooks asked for.

    Attributes:
        context: the :class:`SessionRunContext` shared by every hook of the run.
        options: the merged :class:`RunOptions`; read-only for hooks. The user's object is
            never mutated: hooks' requests are merged into a copy.
        run_metadata: the run's :class:`RunMetadata`.
        tensor_feeds: ``{tensor: value}`` from the hooks and the user, merged.
        str_feeds: ``{name: value}`` from the hooks and the user, merged.
        hook_fetches: ``[(hook index, fetches)]`` for the hooks that asked for fetches.
        results: ``{hook index: evaluated fetches}``, filled by :meth:`HookRunner.evaluate`.
    """

    __slots__ = (
        "context", "options", "run_metadata", "tensor_feeds", "str_feeds", "hook_fetches",
        "results",
    )

    def __init__(self, context: SessionRunContext, options: RunOptions) -> None:
        self.context = context
        self.options = options
        self.run_metadata = RunMetadata()
        # Read-only empty defaults: most runs feed nothing, and this object is made per run.
        self.tensor_feeds: Mapping[torch.Tensor, Any] = _NO_FEEDS
        self.str_feeds: Mapping[str, Any] = _NO_FEEDS
        # shared empty defaults, replaced on the first hook request: most runs fetch nothing
        self.hook_fetches: List[Tuple[int, Any]] = _NO_FETCHES  # type: ignore[assignment]
        self.results: Dict[int, Any] = _NO_RESULTS  # type: ignore[assignment]

    @property
    def wants_trace(self) -> bool:
        """Whether a hook or the user asked for a profiler trace of this run."""
        return self.options.trace_level > RunOptions.NO_TRACE


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
    pending.run_metadata.profile = profile
    return profile


class HookRunner:
    """Runs a fixed list of hooks with TensorFlow's ``_HookedSession`` rules.

    Each hook's ``before_run``/``after_run`` is looked up once, here (bound methods, and only
    the ones a hook overrides): replacing them on a hook later has no effect on this runner.

    Args:
        hooks: the session's hooks, called in this order at every point.
        argument: the argument name the hooks came from, for error messages.

    Raises:
        TypeError: an item of ``hooks`` is not a :class:`SessionRunHook`.
    """

    def __init__(self, hooks: Any, argument: str = "hooks") -> None:
        self.hooks = check_hooks(hooks, argument)
        self.keys = state_keys(self.hooks)
        # Skipping the base class's empty methods is invisible to hooks and keeps the
        # per-run cost proportional to the hooks that do something.
        # bound methods, looked up once: these loops run at every step
        self._before = [
            (i, h, h.before_run) for i, h in enumerate(self.hooks) if _overrides(h, "before_run")
        ]
        self._after = [
            (i, h.after_run) for i, h in enumerate(self.hooks) if _overrides(h, "after_run")
        ]
        self._after_calls = [after_run for _, after_run in self._after]
        #: no hook overrides ``before_run`` or ``after_run``: a run needs no hook calls
        self.idle_per_run = not self._before and not self._after
        self.should_stop = False
        self._default_options = RunOptions()

    # -- session lifecycle -------------------------------------------------------------------
    def begin(self) -> None:
        """Call every hook's ``begin()`` in order."""
        for hook in self.hooks:
            hook.begin()

    def after_create_session(self, session: RawSession, coord: Coordinator) -> None:
        """Call every hook's ``after_create_session(session, coord)`` in order."""
        for hook in self.hooks:
            hook.after_create_session(session, coord)

    def end(self, session: Optional[RawSession]) -> None:
        """Call every hook's ``end(session)`` in order; an exception skips the later hooks."""
        for hook in self.hooks:
            hook.end(session)

    # -- one run ---------------------------------------------------------------------------
    def before_run(
        self,
        session: RawSession,
        fetches: Any = None,
        feed_dict: Optional[Mapping[Any, Any]] = None,
        options: Optional[RunOptions] = None,
    ) -> PendingRun:
        """Call every hook's ``before_run`` in order and merge their requests.

        Args:
            session: the raw session handed to hooks in the run context.
            fetches: the user's fetches (for ``run_context.original_args``).
            feed_dict: the user's feeds.
            options: the user's run options (copied, never mutated).

        Returns:
            The :class:`PendingRun` the engine executes.

        Raises:
            RuntimeError: a stop was requested earlier, or two feeds conflict (TF's texts).
            TypeError: a hook returned something else than ``SessionRunArgs``/``None``, or
                asked for an invalid fetch or feed.
        """
        if self.should_stop:
            raise RuntimeError(STOP_REQUESTED_MESSAGE)
        if options is None:
            merged = self._default_options  # copied before a hook's request is merged in
        elif isinstance(options, RunOptions):
            merged = options  # likewise: the user's object is never mutated
        else:
            raise TypeError(f"options must be a RunOptions or None, got {type(options).__name__}.")
        context = SessionRunContext(SessionRunArgs(fetches, feed_dict), session)
        pending = PendingRun(context, merged)
        hook_feeds: Optional[Dict[Any, Any]] = None
        for i, hook, before_run in self._before:
            request = before_run(context)
            if request is None:
                continue
            if type(request) is not SessionRunArgs and not isinstance(request, SessionRunArgs):
                raise TypeError(
                    f"{_hook_name(hook)}.before_run must return a SessionRunArgs or None, "
                    f"got {type(request).__name__}."
                )
            if request.fetches is not None:
                check_fetches(request.fetches, f"{_hook_name(hook)}.before_run fetches")
                if pending.hook_fetches is _NO_FETCHES:
                    pending.hook_fetches, pending.results = [], {}
                pending.hook_fetches.append((i, request.fetches))
            if request.feed_dict:
                split_feeds(request.feed_dict, f"{_hook_name(hook)}.before_run feed_dict")
                if hook_feeds is None:
                    hook_feeds = {}
                _raise_if_feeds_intersect(
                    hook_feeds, request.feed_dict, "Same tensor is fed by two hooks."
                )
                hook_feeds.update(request.feed_dict)
            if request.options:
                if pending.options is merged:
                    pending.options = copy.copy(merged)
                pending.options.merge_from(request.options)
        if feed_dict or hook_feeds:
            user_tensor_feeds, user_str_feeds = split_feeds(feed_dict, "feed_dict")
            if hook_feeds:
                if feed_dict:
                    _raise_if_feeds_intersect(
                        feed_dict, hook_feeds, "Same tensor is fed by a SessionRunHook and user."
                    )
                hook_tensor_feeds, hook_str_feeds = split_feeds(hook_feeds, "feed_dict")
                user_tensor_feeds = {**hook_tensor_feeds, **user_tensor_feeds}
                user_str_feeds = {**hook_str_feeds, **user_str_feeds}
            pending.tensor_feeds = user_tensor_feeds
            pending.str_feeds = user_str_feeds
        return pending

    def evaluate(
        self, pending: PendingRun, namespaces: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Evaluate every hook's fetches after the step, against the step's namespaces."""
        feeds = pending.str_feeds
        for i, fetches in pending.hook_fetches:
            pending.results[i] = evaluate(
                fetches, namespaces, feeds, f"{_hook_name(self.hooks[i])}.before_run fetches"
            )

    def after_run(self, pending: PendingRun) -> None:
        """Call every hook's ``after_run`` in order, then apply a requested stop.

        An exception in a hook's ``after_run`` skips the later hooks and propagates; the stop
        flag is then not applied (TF's rule).
        """
        context, results = pending.context, pending.results
        no_results = SessionRunValues(None, pending.options, pending.run_metadata)
        if not results:
            for after_run in self._after_calls:
                after_run(context, no_results)
        else:
            for i, after_run in self._after:
                if i in results:
                    values = SessionRunValues(results[i], pending.options, pending.run_metadata)
                    after_run(context, values)
                else:
                    after_run(context, no_results)
        self.should_stop = self.should_stop or context.stop_requested

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Every hook's ``state_dict()`` under its unique key."""
        return {key: hook.state_dict() for key, hook in zip(self.keys, self.hooks)}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Give each hook the state saved under its key.

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
        load_hook_states(self.hooks, self.keys, state, strict)
