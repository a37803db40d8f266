"""``FeedFnHook``: feed the values a function returns, before every run."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from lightning_finalops.session_run_hook import (
    Agreement,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
)

__all__ = ["FeedFnHook"]


class FeedFnHook(SessionRunHook):
    """Calls ``feed_fn()`` once before every run and feeds what it returns to that run.

    ``before_run`` returns ``SessionRunArgs(fetches=None, feed_dict=feed_fn())``, so the feeds
    follow the usual rules: ``{tensor: value}`` overrides the tensor for that run only (restored
    afterwards); ``{"name": value}`` is passed to the step as a keyword argument (under
    Lightning: set on a dict batch). A key fed by two hooks raises ``RuntimeError("Same
    tensor is fed by two hooks. ...")``, a key fed by a hook and the user
    ``RuntimeError("Same tensor is fed by a SessionRunHook and user. ...")``.

    Args:
        feed_fn: a function of no arguments returning the run's feed dict (or ``None``).

    Raises:
        TypeError: ``feed_fn`` is not callable.
    """

    def __init__(self, feed_fn: Callable[[], Optional[Mapping[Any, Any]]]) -> None:
        if not callable(feed_fn):
            raise TypeError(
                "feed_fn must be a callable of no arguments returning a feed dict, got "
                f"{type(feed_fn).__name__} ({feed_fn!r})."
            )
        self.feed_fn = feed_fn

    def agreement(self) -> Agreement:
        """Nothing to agree on: it only feeds."""
        return Agreement()

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Call ``feed_fn()`` and feed its result to this run."""
        return SessionRunArgs(fetches=None, feed_dict=self.feed_fn())
