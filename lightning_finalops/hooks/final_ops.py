"""``FinalOpsHook``: evaluate tensors, metrics or callables once, when a session ends.

``ResultsExportHook`` sends the scalar results of such hooks to the engine's loggers.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch

from lightning_finalops.evaluation_loop import metrics_reached
from lightning_finalops.fetches import (
    check_fetches,
    format_path,
    full_values,
    is_fetch_leaf,
    is_metric,
    is_scalar,
    leaves,
    map_structure,
    path_keys,
    path_tag,
    split_feeds,
    to_host,
)
from lightning_finalops.hook_state import latest_results, new_results
from lightning_finalops.session_run_hook import Agreement, RawSession, SessionRunHook
from lightning_finalops.sync_audit import host_values
from lightning_finalops.validation import check_bool, check_int, describe

__all__ = ["FinalOpsHook", "ResultsExportHook"]

# ids of the live metrics a warning already named as accumulating across sessions (one new
# hook per evaluation session names a metric never reset once, not in every session); by id:
# a torchmetrics metric's hash follows its state
_NAMED_ACCUMULATING: Set[int] = set()

logger = logging.getLogger("lightning_finalops")

_DEPENDS_ON_INPUT_WARNING = (
    "An OutOfRangeError or StopIteration exception is raised by the code in FinalOpsHook. "
    "This typically means the Ops running by the FinalOpsHook have a dependency back to some "
    "input source, which should not happen. For example, for metrics in "
    "tf.estimator.Estimator, all metrics functions return two Ops: `value_op` and  "
    "`update_op`. Estimator.evaluate calls the `update_op` for each batch of the data in input "
    "source and, once it is exhausted, it call the `value_op` to get the metric values. The "
    "`value_op` here should have dependency back to variables reading only, rather than "
    "reading another batch from input. Otherwise, the `value_op`, executed by `FinalOpsHook`, "
    "triggers another data reading, which ends OutOfRangeError/StopIteration. Please fix that."
)


def _describe_leaf(leaf: Any) -> str:
    if leaf is None or isinstance(leaf, str):
        return repr(leaf)
    if isinstance(leaf, torch.Tensor):
        return "tensor" + str(list(leaf.shape))
    if is_metric(leaf):
        return type(leaf).__name__
    return getattr(leaf, "__qualname__", type(leaf).__name__)


def _describe_fetches(final_ops: Any) -> str:
    """What a fetch structure evaluates, stable across processes: ``acc=Accuracy,loss='loss'``."""
    parts = []
    for path, leaf in leaves(final_ops, ("",), is_fetch_leaf):
        assert path is not None
        position = "/".join(map(str, path_keys(path)))
        parts.append(f"{position}={_describe_leaf(leaf)}" if position else _describe_leaf(leaf))
    return ",".join(parts)


class FinalOpsHook(SessionRunHook):
    """Evaluates ``final_ops`` once, in ``end()``, through the raw session (no hooks fire).

    It fetches nothing per run, so it costs nothing per step. ``final_ops`` is a fetch
    structure (a tensor, a metric with ``compute()``, a callable, a name, or nested
    list/tuple/dict of them); ``final_ops_values`` keeps its structure, with tensors left on
    the device they were computed on (:func:`~lightning_finalops.to_host` brings a whole
    structure to the host in one transfer). Every ``end()`` also appends
    ``(global_step, values)`` to ``final_ops_history``, so a hook reused for several
    sessions (every validation run under Lightning) keeps each result. Recorded values are
    copies: nothing changes them afterwards.

    Metrics: a torchmetrics ``Metric`` is evaluated as it stands when the session ends. Log
    it in ``validation_step`` (``self.val_acc(logits, y); self.log("val_acc",
    self.val_acc)``) and Lightning computes it per validation and resets it after; an empty
    metric that this hook recorded at the same global step gives that recorded value (so the
    end of ``fit`` repeats the validation run at its last step). Any other empty metric
    gives its empty default, with a warning naming it (reset it when an evaluation starts,
    not at its end); so does a metric whose updates carry over from one session to the next
    (never reset). A ``MetricCollection`` is evaluated as it stands, without these rules.

    Its :attr:`state_key` names what it evaluates (``FinalOpsHook{acc=MulticlassAccuracy,
    loss='val_loss'}``), so a resume gives each hook its own history even when hooks were
    added, removed or reordered; ``name`` replaces that description by a name of your own
    (``FinalOpsHook[name]``), which keeps the key when ``final_ops`` changes.

    Args:
        final_ops: what to evaluate at the end of the session; ``None`` evaluates nothing.
        final_ops_feed_dict: feeds for that one evaluation: ``{tensor: value}`` overrides a
            tensor, ``{"name": value}`` is passed to the fetched callables that accept it.
        name: identifies the hook's state in checkpoints instead of ``final_ops``.
        max_history: keep only the latest N entries of ``final_ops_history`` (in memory and
            in checkpoints); ``None`` keeps every one.
        history_on_host: keep the history on the host: each entry is brought there with
            one :func:`~lightning_finalops.to_host` transfer at the ``end()`` that records
            it (one host synchronisation per session end, none per step);
            ``final_ops_values`` stays on the device.

    Memory: by default every entry keeps its tensors on their device, so a hook over
    weights holds one copy of them per session end (every validation under Lightning), and
    every checkpoint holds the whole history. Bound it with ``max_history``, move it with
    ``history_on_host``, or fetch scalars (a metric, a norm) rather than whole tensors.

    Raises:
        TypeError: a leaf of ``final_ops`` cannot be fetched (the message names its position,
            e.g. ``final_ops['acc'][1]``): a module, a class (``MeanMetric`` rather than
            ``MeanMetric()``), a callable needing arguments that no str feed of
            ``final_ops_feed_dict`` supplies; or ``final_ops_feed_dict`` is not a mapping
            of tensor or str keys; or ``name`` is not a non-empty str.
    """

    def __init__(
        self,
        final_ops: Any,
        final_ops_feed_dict: Optional[Mapping[Any, Any]] = None,
        *,
        name: Optional[str] = None,
        max_history: Optional[int] = None,
        history_on_host: bool = False,
    ) -> None:
        self._max_history = check_int(max_history, "max_history", minimum=1, allow_none=True)
        self._history_on_host = check_bool(history_on_host, "history_on_host")
        _, str_feeds = split_feeds(final_ops_feed_dict, "final_ops_feed_dict")
        check_fetches(final_ops, "final_ops", str_feeds=list(str_feeds))
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {describe(name)}.")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''.")
        self._state_key = f"FinalOpsHook[{name}]" if name else (
            "FinalOpsHook{" + _describe_fetches(final_ops) + "}"
        )
        self._final_ops = final_ops
        self._final_ops_feed_dict = final_ops_feed_dict
        self._final_ops_values: Any = None
        self._final_ops_history: List[Tuple[int, Any]] = []
        # torchmetrics metrics among the final ops, with their positions: see end()
        self._metrics = [
            (path, leaf) for path, leaf in leaves(final_ops, ("final_ops",), is_fetch_leaf)
            if is_metric(leaf) and hasattr(leaf, "update_count")
        ]
        self._has_names = any(
            isinstance(leaf, str) for _, leaf in leaves(final_ops, ("final_ops",), is_fetch_leaf)
        )
        # every metric the final ops use (also inside callables): see _check_metrics
        self._reached = metrics_reached(final_ops)
        self._updates_at_start: Dict[int, int] = {}
        self._warned: set = set()

    def agreement(self) -> Agreement:
        """Nothing to agree on: it reads its values at the session's end."""
        return Agreement()

    def begin(self) -> None:
        """Note how many updates each metric it reads has, to tell one never reset at ``end``."""
        self._updates_at_start = {id(m): m.update_count for m in self._reached}

    @property
    def final_ops(self) -> Any:
        """The fetch structure evaluated at ``end()``."""
        return self._final_ops

    @property
    def state_key(self) -> str:
        """``FinalOpsHook{<what final_ops evaluates>}``, or ``FinalOpsHook[<name>]``."""
        return self._state_key

    @property
    def records_results(self) -> bool:
        """Whether its final ops are a dict: then each ``end()`` records named results."""
        return isinstance(self._final_ops, Mapping)

    def latest_results(self) -> Optional[Tuple[int, Mapping[str, Any]]]:
        """Its latest ``(global_step, values)`` entry when the values are a dict, else ``None``."""
        history = self._final_ops_history
        if history and isinstance(history[-1][1], Mapping):
            return history[-1]
        return None

    @property
    def final_ops_values(self) -> Any:
        """The values of the latest ``end()``; ``None`` until an ``end()`` ran."""
        return self._final_ops_values

    @property
    def final_ops_history(self) -> List[Tuple[int, Any]]:
        """``(global_step, values)`` for every ``end()`` that ran, oldest first."""
        return self._final_ops_history

    def end(self, session: Optional[RawSession]) -> None:
        """Evaluate ``final_ops`` through the raw session.

        A torchmetrics metric that is empty (no update since its last reset) while this
        hook recorded it at this very global step (Lightning resets a metric logged with
        ``self.log(name, metric)`` after the validation, so at the end of ``fit`` it is
        empty) evaluates to that recorded value, not to an empty metric's default. An empty
        metric otherwise evaluates to its default, with a warning naming it; so does a
        metric whose updates pile up from one session to the next (never reset).

        A name that resolves nowhere (no run of this session produced it: a resumed
        Lightning run that ran no validation here has no ``val_loss``) never ends the
        session with an error: its value is ``None`` in the entry, with a warning naming it.

        Raises:
            StopIteration: a final op read from exhausted input (logged with TF's warning).
        """
        if self._final_ops is None:
            return
        assert session is not None, "FinalOpsHook.end() needs the session it ran in."
        fetches = self._resolve_names(session, self._fetches_now(session.global_step))
        try:
            values = session.run(fetches, feed_dict=self._final_ops_feed_dict)
        except StopIteration:
            logger.warning(_DEPENDS_ON_INPUT_WARNING)
            raise
        self._check_metrics(session.global_step)
        # a sharded value (a weight of an FSDP2 model) is recorded whole, on every rank: one
        # collective here, at the session's end, never per step
        values = full_values(values)
        self._final_ops_values = values
        self._final_ops_history.append(
            (session.global_step, to_host(values) if self._history_on_host else values)
        )
        if self._max_history is not None:
            del self._final_ops_history[: -self._max_history]

    def _resolve_names(self, session: RawSession, fetches: Any) -> Any:
        """``fetches`` with each name replaced by its value; one that resolves nowhere: ``None``.

        Each name is looked up once, before anything else is evaluated, so a missing one
        never makes another final op run twice. A resumed Lightning run that ran no
        validation in this process, for example, has no ``val_loss`` at the end of ``fit``:
        the end of the session goes on, with a warning.
        """
        if not self._has_names:
            return fetches

        def resolve(leaf: Any, path: Any) -> Any:
            if not isinstance(leaf, str):
                return leaf
            try:
                value = session.run(leaf)
            except KeyError as e:
                logger.warning(
                    "FinalOpsHook: %s: no run of this session produced the name %r, so the "
                    "entry at global step %d holds None there (%s).",
                    format_path(path), leaf, session.global_step, e.args[0] if e.args else e,
                )
                value = None
            return lambda: value

        return map_structure(resolve, fetches, ("final_ops",), is_fetch_leaf)

    def _fetches_now(self, global_step: int) -> Any:
        """``final_ops``, each empty metric recorded at this step replaced by its value then."""
        emptied = {id(m) for _, m in self._metrics if m.update_count == 0}
        history = self._final_ops_history
        if not emptied or not history or history[-1][0] != global_step:
            return self._final_ops
        latest = history[-1][1]

        def keep_latest(leaf: Any, path: Any) -> Any:
            if id(leaf) not in emptied:
                return leaf
            value = latest
            for key in path_keys(path):
                try:
                    value = value[key]
                except (KeyError, IndexError, TypeError):
                    return leaf  # the latest entry has no value there: compute() it
            return lambda: value

        return map_structure(keep_latest, self._final_ops, ("final_ops",), is_fetch_leaf)

    def _check_metrics(self, global_step: int) -> None:
        """Warn about an empty metric and one whose updates pile up across sessions."""
        recorded_now = bool(self._final_ops_history) and \
            self._final_ops_history[-1][0] == global_step
        positions = {id(metric): format_path(path) for path, metric in self._metrics}
        for path, metric in self._metrics:
            if metric.update_count == 0 and not recorded_now and id(metric) not in self._warned:
                self._warned.add(id(metric))
                logger.warning(
                    "FinalOpsHook: %s (%s) has no update at the end of the session (reset "
                    "before the session ended, or never updated), so it gives its empty "
                    "default. Reset it when an evaluation starts (on_validation_epoch_start) "
                    "rather than at its end, or fetch the value you logged by name.",
                    format_path(path), type(metric).__name__,
                )
        for metric in self._reached:
            updates, before = metric.update_count, self._updates_at_start.get(id(metric))
            if before and updates > before and id(metric) not in _NAMED_ACCUMULATING:
                _NAMED_ACCUMULATING.add(id(metric))  # once per metric, whichever hook reads it
                try:  # the id is free again once the metric is gone
                    weakref.finalize(metric, _NAMED_ACCUMULATING.discard, id(metric))
                except TypeError:  # not weakly referable: its id stays named
                    pass
                logger.warning(
                    "FinalOpsHook: %s (%s) had %d updates when this session began and %d at "
                    "its end: it was not reset, so its value accumulates across sessions "
                    "(every validation, the sanity check, earlier evaluations; TF "
                    "re-initialised metrics with each session). Log it with "
                    "self.log(name, metric), which makes Lightning reset it after each epoch, "
                    "or call its reset() when an evaluation starts "
                    "(on_validation_epoch_start).",
                    positions.get(id(metric), "a metric its final ops use"),
                    type(metric).__name__, before, updates,
                )

    def state_dict(self) -> Dict[str, Any]:
        """The history of final values, so a resumed run keeps the evaluations before it."""
        return {"final_ops_history": list(self._final_ops_history)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history; ``final_ops_values`` becomes its latest values.

        Raises:
            ValueError: ``state_dict`` is not what :meth:`state_dict` returned.
        """
        if set(state_dict) != {"final_ops_history"}:
            raise ValueError(
                "FinalOpsHook.load_state_dict expects {'final_ops_history': [...]}, got keys "
                f"{sorted(state_dict)}."
            )
        history = [(int(step), values) for step, values in state_dict["final_ops_history"]]
        if self._max_history is not None:
            del history[: -self._max_history]
        self._final_ops_history = history
        self._final_ops_values = history[-1][1] if history else None


class ResultsExportHook(SessionRunHook):
    """Sends the scalar results hooks recorded in a session to the engine's loggers at ``end()``.

    List it after the hooks it reads (any hook that records results, see
    :meth:`SessionRunHook.latest_results`). At ``end()`` it collects the scalar leaves of
    what each hook recorded in this session (one-element tensors and plain numbers), brings
    them to the host in one transfer (larger tensors, such as weights, stay where they are)
    and calls ``session.log_metrics`` with ``{"<prefix>/<key>": value}`` at the session's
    global step (``"<prefix>/<i>/<key>"`` when it reads several hooks), as
    ``Estimator.evaluate`` wrote its summary.

    Args:
        hooks: the hooks whose results to send.
        prefix: the tag prefix, for example ``"final_ops/val"``.
    """

    def __init__(self, hooks: List[SessionRunHook], prefix: str) -> None:
        self._hooks = list(hooks)
        self._prefix = prefix
        self._before: List[Any] = []

    def agreement(self) -> Agreement:
        """Nothing to agree on."""
        return Agreement()

    def begin(self) -> None:
        """Note each hook's latest results: only newer ones are this session's."""
        self._before = latest_results(self._hooks)

    def end(self, session: Optional[RawSession]) -> None:
        """Send the scalar results recorded in this session to ``session.log_metrics``."""
        if session is None:
            return
        tags: List[str] = []
        scalars: List[Any] = []
        for i, latest in new_results(self._hooks, self._before):
            root = self._prefix if len(self._hooks) == 1 else f"{self._prefix}/{i}"
            for path, value in leaves(latest[1], (root,)):
                if is_scalar(value):  # a one-element tensor, a number, a numpy scalar
                    assert path is not None
                    tags.append(path_tag(path))
                    scalars.append(value)
        if tags:
            host = to_host(scalars)  # the one wait
            with host_values():
                metrics = {tag: float(value) for tag, value in zip(tags, host)}
            session.log_metrics(metrics, step=session.global_step)
