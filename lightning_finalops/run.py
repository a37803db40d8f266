"""One run's record: what the hooks asked for, merged, and the run's protected region.

:class:`PendingRun` holds a run between its start and its end: the merged fetches, feeds
and options of the hooks and the user (TF's conflict rules), and the protected region (the
tensor feeds applied, the profiler trace) that the core enters after ``before_run`` and
leaves before the first ``after_run``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from lightning_finalops.engine import EMPTY
from lightning_finalops.fetches import (
    TensorFeeds,
    check_fetches,
    check_str_feeds_accepted,
    shares_memory,
    split_feeds,
)
from lightning_finalops.session_run_hook import (
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "new_tuple",
    "NO_RESULTS",
    "PendingRun",
    "trace_run",
]

DEFAULT_OPTIONS = RunOptions()
# Builds a NamedTuple (SessionRunArgs, SessionRunValues) without its Python-level __new__:
# ``new_tuple(SessionRunValues, (a, b, c))`` is ``SessionRunValues(a, b, c)``, one frame
# fewer on the path every run takes.
new_tuple = tuple.__new__

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
NO_RESULTS = new_tuple(SessionRunValues, (None, DEFAULT_OPTIONS, _NO_TRACE))


def raise_if_feeds_intersect(
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
        self.tensor_feeds: Mapping[torch.Tensor, Any] = EMPTY
        self.str_feeds: Mapping[str, Any] = EMPTY
        self.hook_fetches: Sequence[Tuple[int, Any]] = ()
        self._hook_feeds: Optional[Dict[Any, Any]] = None  # gathered in the hooks' order
        self._applied: Optional[TensorFeeds] = None
        self._trace: Any = None

    def add_request(self, hook: SessionRunHook, i: int, request: Any) -> None:
        """Check what hook ``i`` returned from ``before_run`` and add it to the run's requests.

        Raises:
            TypeError: ``request`` is not a ``SessionRunArgs``, or holds an invalid fetch or
                feed key.
            RuntimeError: it feeds a tensor another hook of the run feeds (TF's text).
        """
        name = type(hook).__name__
        if not isinstance(request, SessionRunArgs):
            raise TypeError(
                f"{name}.before_run must return a SessionRunArgs or None, "
                f"got {type(request).__name__}."
            )
        if request.fetches is not None:
            check_fetches(request.fetches, f"{name}.before_run fetches")
            self.hook_fetches = [*self.hook_fetches, (i, request.fetches)]
        if request.feed_dict:
            split_feeds(request.feed_dict, f"{name}.before_run feed_dict")
            if self._hook_feeds is None:
                self._hook_feeds = {}
            raise_if_feeds_intersect(
                self._hook_feeds, request.feed_dict, "Same tensor is fed by two hooks."
            )
            self._hook_feeds.update(request.feed_dict)
        if request.options:
            self.options = self.options.merged(request.options)

    def merge_feeds(self, fetches: Any, feed_dict: Optional[Mapping[Any, Any]],
                    str_feeds_as_keywords: bool) -> None:
        """Merge the user's feeds with the hooks' into :attr:`tensor_feeds`/:attr:`str_feeds`.

        Args:
            fetches: the user's fetches (with the hooks' fetches, where str feeds must go).
            feed_dict: the user's feeds.
            str_feeds_as_keywords: check that some callable of the run accepts each str feed.

        Raises:
            RuntimeError: the user and a hook feed the same tensor (TF's text).
            ValueError: a str feed that no callable of the run accepts.
        """
        hook_feeds = self._hook_feeds
        if not (feed_dict or hook_feeds):
            return
        tensor_feeds, str_feeds = split_feeds(feed_dict, "feed_dict")
        if hook_feeds:
            if feed_dict:
                raise_if_feeds_intersect(
                    feed_dict, hook_feeds, "Same tensor is fed by a SessionRunHook and user."
                )
            hook_tensor_feeds, hook_str_feeds = split_feeds(hook_feeds, "feed_dict")
            tensor_feeds = {**hook_tensor_feeds, **tensor_feeds}
            str_feeds = {**hook_str_feeds, **str_feeds}
        self.tensor_feeds = tensor_feeds
        self.str_feeds = str_feeds
        if str_feeds and str_feeds_as_keywords:
            check_str_feeds_accepted(str_feeds, fetches, [f for _, f in self.hook_fetches])

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

