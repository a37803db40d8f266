"""One evaluation session in a plain loop: every batch a run, in eval mode under ``no_grad``.

``Estimator.evaluate`` built a ``MonitoredSession`` over the evaluation data and ran its
hooks until the input ended; :func:`run_evaluation` is that loop over a
:class:`~lightning_finalops.HookedSession`, used by ``InMemoryEvaluatorHook``. An evaluation
always runs with its modules in eval mode (dropout off, BatchNorm's running statistics
untouched) under ``torch.no_grad()``, and puts them back as they were.

TF initialised every metric variable when an evaluation's session was created;
:class:`EvaluationMetrics` does that for the torchmetrics metrics an evaluation reaches
(:func:`metrics_reached`), for every evaluation this package runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from lightning_finalops.fetches import accepted_keywords
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.sync_audit import USER, charging
from lightning_finalops.validation import describe

__all__ = [
    "EvaluationMetrics",
    "evaluating",
    "hooks_final_ops",
    "metrics_reached",
    "modules_of",
    "run_evaluation",
]

logger = logging.getLogger("lightning_finalops")


def modules_of(modules: Any, argument: str) -> List[nn.Module]:
    """The modules of ``modules``: a module, a list/tuple of them or a dict of them.

    Raises:
        TypeError: ``modules`` is something else, or holds something else than modules.
    """
    if modules is None:
        return []
    if isinstance(modules, nn.Module):
        return [modules]
    items = list(modules.values()) if isinstance(modules, Mapping) else modules
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(m, nn.Module) for m in items
    ):
        raise TypeError(
            f"{argument} must be a torch.nn.Module, or a list, tuple or dict of them, got "
            f"{describe(modules)}."
        )
    return list(items)


@contextlib.contextmanager
def evaluating(modules: List[nn.Module]) -> Iterator[None]:
    """Every module (and submodule) in eval mode under ``torch.no_grad()``; restored after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def run_evaluation(
    session: HookedSession,
    step: Callable[..., Any],
    batches: Iterable[Any],
    modules: List[nn.Module],
    *,
    max_batches: Optional[int] = None,
    on_outputs: Optional[Callable[[Any], None]] = None,
) -> int:
    """Run one evaluation session: ``begin``, ``create``, one run per batch, ``end``.

    Each run is ``start_run``, ``step(batch)`` with the run's str feeds it accepts, then
    ``finish_run`` (``abort_run`` if the step raised): ``run_step`` with the step's
    ``StopIteration`` told apart from a hook's. The evaluation ends cleanly at the end of
    ``batches``, after ``max_batches`` runs, when a hook stops it, and on a
    ``StopIteration`` from ``step`` (TF's end of input: it never reaches the loop around).
    Any other exception abandons the session (no ``end()``, TF's rule) and propagates; a
    ``StopIteration`` raised by a hook becomes a ``RuntimeError`` (a training loop would
    take it for its own end).

    Args:
        session: a session not yet begun.
        step: called as ``step(batch, **str_feeds)``.
        batches: the evaluation data.
        modules: put in eval mode for the evaluation.
        max_batches: at most this many runs (``None``: until ``batches`` ends).
        on_outputs: called with what ``step`` returned, after each run.

    Returns:
        The number of runs.

    Raises:
        RuntimeError: a hook raised ``StopIteration``.
        BaseException: whatever ``step`` or a hook raised.
    """
    runs = 0
    with evaluating(modules):
        session.begin()
        try:
            session.create()
            iterator = iter(batches)
            while not session.should_stop and (max_batches is None or runs < max_batches):
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                pending = session.start_run(step)
                try:
                    with charging(*USER):  # the user's step: its syncs are the user's
                        outputs = step(batch, **_accepted(step, pending.str_feeds))
                except StopIteration:
                    session.abort_run()
                    break
                except BaseException:
                    session.abort_run()
                    raise
                session.finish_run(outputs)
                runs += 1
                if on_outputs is not None:
                    on_outputs(outputs)
            session.end()
        except StopIteration as e:  # from a hook: a training loop would take it for its end
            session.abandon()
            raise RuntimeError(f"StopIteration raised inside an evaluation: {e!r}") from e
        except BaseException:
            session.abandon()
            raise
    session.coord.raise_requested_exception()
    return runs


def _accepted(step: Callable[..., Any], feeds: Mapping[str, Any]) -> Mapping[str, Any]:
    if not feeds:
        return feeds
    return {k: feeds[k] for k in accepted_keywords(functools.partial(step, None), list(feeds))}


# torchmetrics classes that keep values across evaluations by design: a best-so-far
# (``MaxMetric``/``MinMetric`` in on_validation_epoch_end) and ``MetricTracker``'s history
_ACROSS_EVALUATIONS = frozenset({"MaxMetric", "MinMetric", "MetricTracker"})
_MAX_ITEMS = 64  # of one list, tuple or dict searched for metrics


def _is_counted_metric(obj: Any) -> bool:
    """A torchmetrics ``Metric`` (it counts its updates and resets); never raises."""
    try:
        return isinstance(getattr(obj, "update_count", None), int) and callable(
            getattr(obj, "reset", None)
        )
    except Exception:  # noqa: BLE001 - a proxy whose attribute access fails is no metric
        return False


def _keeps_values_across_evaluations(obj: Any) -> bool:
    return any(cls.__name__ in _ACROSS_EVALUATIONS and cls.__module__.startswith("torchmetrics")
               for cls in type(obj).__mro__)


def _metrics_of_module(module: nn.Module, found: Dict[int, Any]) -> None:
    """The metrics registered on ``module`` and below, but none a tracker keeps."""
    if _keeps_values_across_evaluations(module):
        return
    if _is_counted_metric(module):
        found.setdefault(id(module), module)
    for child in module.children():
        _metrics_of_module(child, found)


def metrics_reached(*roots: Any) -> List[Any]:
    """The torchmetrics metrics reachable from ``roots``, each once, in the order found.

    A root is a module (its submodules are searched: metrics registered on a model), a fetch
    structure (its metric leaves), or a callable: the metrics its closure holds, the globals
    its code names, a ``functools.partial``'s function and arguments, a bound method's
    object; at most three levels from a root, through plain lists, tuples and dicts (their
    first 64 items; no other container is searched, so nothing is computed or loaded). A
    ``MetricCollection`` is reached through its metrics. ``MaxMetric``, ``MinMetric`` and
    ``MetricTracker`` keep values across evaluations by design: they are never reached.
    """
    found: Dict[int, Any] = {}
    seen: Set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            _metrics_of_module(obj, found)
        elif _is_counted_metric(obj):
            if not _keeps_values_across_evaluations(obj):
                found.setdefault(id(obj), obj)
        elif type(obj) is dict:
            for value in itertools.islice(obj.values(), _MAX_ITEMS):
                visit(value, depth + 1)
        elif type(obj) in (list, tuple):
            for value in obj[:_MAX_ITEMS]:
                visit(value, depth + 1)
        elif isinstance(obj, functools.partial):
            for value in (obj.func, *obj.args, *obj.keywords.values()):
                visit(value, depth + 1)
        elif inspect.isfunction(obj) or inspect.ismethod(obj):
            visit(getattr(obj, "__self__", None), depth + 1)
            function = getattr(obj, "__func__", obj)
            for cell in function.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass
            names = function.__globals__
            for name in function.__code__.co_names:
                if name in names:
                    visit(names[name], depth + 1)

    for root in roots:
        visit(root, 0)
    return list(found.values())


def hooks_final_ops(hooks: Iterable[Any]) -> List[Any]:
    """What the hooks evaluate at their end (``FinalOpsHook.final_ops`` and its like)."""
    return [hook.final_ops for hook in hooks if getattr(hook, "final_ops", None) is not None]


class EvaluationMetrics:
    """Resets the metrics an evaluation's values come from when it starts, as TF did.

    TF re-initialised every metric variable when an evaluation's session was created. Here
    the metrics the evaluation's values come from (:meth:`start`'s ``values``: what its
    hooks' final ops and its step reach) are reset when it starts, if an evaluation updated
    them and nothing else did since (their update count is the one that evaluation ended
    with). A metric something else updates too (training) is never reset, and neither is any
    other metric of the evaluated model: those are only watched. A watched or value metric
    that is updated in an evaluation which started with updates it did not reset
    accumulates across evaluations: a warning names it, once.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        # per metric id: (the metric, its update count at the end of the last evaluation that
        # updated it); the metric is held weakly, so a new one at the same address is new
        self._at_end: Dict[int, Tuple[Any, int]] = {}
        self._at_start: Dict[int, Tuple[Any, int]] = {}
        self._warned: Set[int] = set()

    def start(self, values: Iterable[Any], watched: Iterable[Any] = (),
              named_elsewhere: Iterable[Any] = ()) -> None:
        """An evaluation starts: reset the value metrics only evaluations updated.

        Args:
            values: the metrics its values come from (reset when only evaluations update
                them).
            watched: the other metrics it reaches (the model's): never reset, named if they
                accumulate.
            named_elsewhere: metrics another warning names (a ``FinalOpsHook`` reading
                them): not named again here.
        """
        self._at_start = {}
        self._warned.update(id(m) for m in named_elsewhere)
        for metric in values:
            count = metric.update_count
            reference, at_end = self._at_end.get(id(metric), (None, None))
            if count and at_end == count and reference is not None and reference() is metric:
                metric.reset()
                count = metric.update_count
            self._at_start[id(metric)] = (metric, count)
        for metric in watched:
            self._at_start.setdefault(id(metric), (metric, metric.update_count))

    def end(self) -> None:
        """The evaluation ended: remember the counts; warn about what accumulates."""
        for key, (metric, before) in self._at_start.items():
            count = metric.update_count
            if count > before:  # an evaluation updated it: reset next time if nothing else adds
                self._at_end[key] = (weakref.ref(metric), count)
            if before and count > before and key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "%s: the metric %s had %d updates when this evaluation started and was "
                    "updated in it: its value accumulates across evaluations. Reset it when "
                    "an evaluation starts (TF re-initialised metrics for each evaluation), or "
                    "log it with self.log(name, metric) so that Lightning resets it.",
                    self._owner, type(metric).__name__, before,
                )
        self._at_start = {}
