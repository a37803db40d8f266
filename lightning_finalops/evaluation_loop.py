"""One evaluation session in a plain loop: every batch a run, in eval mode under ``no_grad``.

``Estimator.evaluate`` built a ``MonitoredSession`` over the evaluation data and ran its
hooks until the input ended; :func:`run_evaluation` is that loop over a
:class:`~lightning_finalops.HookedSession`, used by ``InMemoryEvaluatorHook``. An evaluation
always runs with its modules in eval mode (dropout off, BatchNorm's running statistics
untouched) under ``torch.no_grad()``, and puts them back as they were.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional

import torch
from torch import nn

from lightning_finalops.fetches import accepted_keywords
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.sync_audit import USER, charging
from lightning_finalops.validation import describe

__all__ = ["evaluating", "modules_of", "run_evaluation"]


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
