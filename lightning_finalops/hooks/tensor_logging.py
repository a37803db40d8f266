"""``LoggingTensorHook``: log fetched values every N runs, every N seconds, or at the end."""

from __future__ import annotations

import logging
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lightning_finalops.fetches import check_fetches, map_structure, to_host
from lightning_finalops.hooks.timers import NeverTriggerTimer, SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    Agreement,
    RawSession,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.sync_audit import host_values
from lightning_finalops.validation import check_bool, check_callable, check_int, check_seconds

__all__ = ["LoggingTensorHook"]

logger = logging.getLogger("lightning_finalops")


def _tag_of(item: Any, position: int, taken: Container[str]) -> str:
    """A stable, readable tag for an item of a list of fetches.

    A name is its own tag (as in TF); a named function is tagged with its name; anything
    else (a tensor, a metric, a lambda), or a name already taken by another item, is tagged
    with its position, ``tensors[i]``: a tensor's repr would show its value at construction.
    ``taken`` holds the names given in the list and the tags already assigned.
    """
    if isinstance(item, str):
        return item
    name = getattr(item, "__name__", None)
    if (
        callable(item)
        and not isinstance(item, torch.Tensor)
        and isinstance(name, str)
        and name.isidentifier()
        and name not in taken
    ):
        return name
    return f"tensors[{position}]"


def _numpy_leaf(value: Any, path: Any = None) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        try:
            array = value.numpy()
        except TypeError:  # dtypes numpy lacks (bfloat16, float8): print them as float32
            array = value.float().numpy()
        return array[()] if array.ndim == 0 else array
    return value


def _numpy(value: Any) -> Any:
    """Host tensors as numpy values (0-d tensors as numpy scalars), containers kept."""
    return map_structure(_numpy_leaf, value)


class _Printed:
    """A leaf whose ``repr`` is its ``str``, so a container prints its leaves as numpy does."""

    __slots__ = ("text",)

    def __init__(self, value: Any) -> None:
        self.text = str(value)

    def __repr__(self) -> str:
        return self.text


def _text(value: Any) -> str:
    """``str`` of a value as numpy prints it; containers without numpy's ``repr`` noise."""
    if isinstance(value, (Mapping, list, tuple)):
        return repr(map_structure(lambda leaf, _: _Printed(leaf), value))
    return str(value)


class LoggingTensorHook(SessionRunHook):
    """Logs the values of fetches every N local runs, every N seconds, and/or at the end.

    The hook counts the runs it has seen in this session (not the global step): the first
    run always logs, then every ``every_n_iter`` runs (``every_n_iter=2`` logs runs 1, 3, 5)
    or on the first run after ``every_n_secs`` seconds. Only those runs fetch anything; the
    others return no fetches, so they cost no evaluation and no device-to-host transfer. A
    logging run brings all its values to the host in one :func:`~lightning_finalops.to_host`
    transfer and logs ``"tag1 = v1, tag2 = v2"`` (values printed as numpy prints them with
    ``suppress=True``, a scalar tensor as a plain number: ``loss = 0.25``), followed by
    ``" (0.123 sec)"`` since the previous log, at INFO level on the ``lightning_finalops``
    logger. With ``at_end=True``, ``end()`` evaluates the fetches once more through the raw
    session and logs them, so a fetch with side effects runs again (TF's rule). ``begin()``
    resets the count and the timer.

    Args:
        tensors: a dict ``{tag: fetch}`` (logged in sorted tag order), or a list/tuple of
            fetches logged in the given order and tagged with the item itself when it is a
            name, with a named function's ``__name__``, else with its position
            (``tensors[1]``). A fetch is a tensor, a metric with ``compute()``, a callable, or
            a name looked up in the run's returned dict (then the session's named values).
        every_n_iter: log once every N local runs.
        every_n_secs: log at most once every N seconds (time read through
            ``lightning_finalops.hooks.timers.clock``).
        at_end: also log at the end of the session.
        formatter: ``formatter(values) -> str`` replaces the default text; ``values`` maps
            each tag to its host value (numpy scalars/arrays in place of tensors).

    Raises:
        ValueError: ``"either at_end and/or exactly one of every_n_iter and every_n_secs must
            be provided."``, ``"invalid every_n_iter=%s."`` (TF's messages), or ``tensors`` is
            empty.
        TypeError: ``tensors`` is not a dict or list/tuple, a dict tag is not a str, a fetch
            cannot be fetched (the message names its position, e.g. ``tensors['loss']``), or
            ``every_n_iter``/``every_n_secs``/``formatter`` has the wrong type.
    """

    def __init__(
        self,
        tensors: Union[Mapping[str, Any], Sequence[Any]],
        every_n_iter: Optional[int] = None,
        every_n_secs: Optional[float] = None,
        at_end: bool = False,
        formatter: Optional[Callable[[Dict[str, Any]], str]] = None,
    ) -> None:
        check_bool(at_end, "at_end")
        only_log_at_end = at_end and every_n_iter is None and every_n_secs is None
        if not only_log_at_end and (every_n_iter is None) == (every_n_secs is None):
            raise ValueError(
                "either at_end and/or exactly one of every_n_iter and every_n_secs must be "
                "provided."
            )
        every_n_iter = check_int(every_n_iter, "every_n_iter", allow_none=True)
        if every_n_iter is not None and every_n_iter <= 0:
            raise ValueError(f"invalid every_n_iter={every_n_iter}.")
        check_seconds(every_n_secs, "every_n_secs", allow_none=True, allow_zero=True)
        check_callable(formatter, "formatter", "formatter(values) -> str, taking the dict "
                       "of values", 1)
        self._tensors, self._tag_order = self._tags(tensors)
        self._formatter = formatter
        self._log_at_end = at_end
        self._timer: SecondOrStepTimer = (
            NeverTriggerTimer()
            if only_log_at_end
            else SecondOrStepTimer(
                every_secs=every_n_secs, every_steps=every_n_iter,
                secs_argument="every_n_secs", steps_argument="every_n_iter",
            )
        )
        self._iter_count = 0
        self._should_trigger = False

    def agreement(self) -> Agreement:
        """Rank 0's clock when it logs on seconds (so every rank logs at the same step)."""
        return Agreement(time=self._timer.uses_time)

    @staticmethod
    def _tags(tensors: Any) -> Tuple[Dict[str, Any], List[str]]:
        """``({tag: fetch}, tag order)`` for a dict or a list/tuple of fetches."""
        if isinstance(tensors, Mapping):
            for tag in tensors:
                if not isinstance(tag, str):
                    raise TypeError(
                        f"tensors: dict tags must be str, got {type(tag).__name__} ({tag!r})."
                    )
            check_fetches(tensors, "tensors")
            by_tag = dict(tensors)
            order = sorted(by_tag)
        elif isinstance(tensors, (list, tuple)):
            check_fetches(tensors, "tensors")
            names = {item for item in tensors if isinstance(item, str)}
            by_tag = {}
            order = []
            for i, item in enumerate(tensors):
                tag = _tag_of(item, i, names | set(by_tag))
                if tag in by_tag:  # the same name twice: fetched and logged once
                    continue
                by_tag[tag] = item
                order.append(tag)
        else:
            raise TypeError(
                "tensors must be a dict {tag: fetch} or a list/tuple of fetches, got "
                f"{type(tensors).__name__} ({tensors!r})."
            )
        if not by_tag:
            raise ValueError(f"tensors must hold at least one fetch, got {tensors!r}.")
        return by_tag, order

    def begin(self) -> None:
        """Reset the schedule: the session's first run logs."""
        self._timer.reset()
        self._iter_count = 0
        self._should_trigger = False

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        """Fetch the values on a logging run only; return ``None`` on the others."""
        self._should_trigger = self._timer.should_trigger_for_step(self._iter_count)
        if self._should_trigger:
            return SessionRunArgs(self._tensors)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Log the fetched values on a logging run; count the run."""
        if self._should_trigger:
            self._log(run_values.results)
        self._iter_count += 1

    def end(self, session: Optional[RawSession]) -> None:
        """With ``at_end``, evaluate the fetches once more through the raw session and log."""
        if self._log_at_end and session is not None:
            self._log(session.run(self._tensors))

    def _log(self, values: Mapping[str, Any]) -> None:
        host_tensors = to_host(values)  # one transfer for every value of the log
        with host_values():
            host = _numpy(host_tensors)
        elapsed_secs, _ = self._timer.update_last_triggered_step(self._iter_count)
        with np.printoptions(suppress=True):  # TF's options while formatting, formatter too
            if self._formatter is not None:
                logger.info("%s", self._formatter(host))
                return
            text = ", ".join(f"{tag} = {_text(host[tag])}" for tag in self._tag_order)
        if elapsed_secs is not None:
            logger.info("%s (%.3f sec)", text, elapsed_secs)
        else:
            logger.info("%s", text)
