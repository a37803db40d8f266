"""TF Estimator's early-stopping hooks (``tf.estimator.experimental.stop_if_*_hook``).

The predicates are TF's, exactly (``tensorflow_estimator/.../early_stopping.py``):

* thresholds are strict, and the first evaluation anywhere in the history that crosses one
  stops;
* "no increase/decrease" walks the history in step order, keeps the best evaluation (ties are
  no improvement) and stops once ``eval step - best eval step >= max_steps_without_...`` at
  any evaluation: both are **evaluation** steps, never the live training step;
* evaluations below ``min_steps`` are ignored entirely (not even a baseline);
* no evaluation yet means no stop.

What replaces TF's ``estimator`` argument is ``eval_results``: where the evaluation history
comes from. TF read the summaries ``Estimator.evaluate`` wrote to ``model_dir/eval``; here it
is a :class:`~lightning_finalops.FinalOpsHook` (its ``final_ops_history``), an object with an
``evaluation_history`` (``HookCallback``, ``InMemoryEvaluatorHook``), or ``None`` with
``eval_dir`` naming a directory of TensorBoard event files, read as TF did.
"""

from __future__ import annotations

import collections
import glob
import logging
import math
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from lightning_finalops.fetches import is_scalar, to_host
from lightning_finalops.hooks.final_ops import FinalOpsHook
from lightning_finalops.hooks.timers import SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    AgreedValue,
    Agreement,
    RawSession,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.validation import check_int, check_number, check_path, describe

__all__ = [
    "EarlyStoppingHook",
    "make_early_stopping_hook",
    "read_eval_metrics",
    "refuse_in_evaluation",
    "stop_if_higher_hook",
    "stop_if_lower_hook",
    "stop_if_no_decrease_hook",
    "stop_if_no_increase_hook",
]

logger = logging.getLogger("lightning_finalops")

# -- where evaluations come from -------------------------------------------------------------
def read_eval_metrics(eval_dir: str) -> collections.OrderedDict[int, Dict[str, float]]:
    """Every scalar summary of the TensorBoard event files in ``eval_dir``, by step.

    TF's ``read_eval_metrics``: the files ``events.out.tfevents.*`` of ``eval_dir`` (not its
    subdirectories) are read in name order; every value with a ``simple_value`` (what
    ``SummaryWriter.add_scalar`` writes) is stored under its event's step, values of one step
    merge (a later one overwrites). A corrupt or truncated record skips the rest of its
    file, with a warning; a missing directory gives ``{}``.

    Args:
        eval_dir: the directory of event files.

    Returns:
        ``OrderedDict({global step: {tag: value}})``, steps ascending.

    Raises:
        TypeError: ``eval_dir`` is not a str or ``os.PathLike``.
        ValueError: ``eval_dir`` is empty.
        ImportError: the ``tensorboard`` package (a dependency) is not installed.
    """
    eval_dir = check_path(eval_dir, "eval_dir")
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.compat.tensorflow_stub import errors
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    except ImportError as e:  # pragma: no cover - tensorboard is a dependency
        raise ImportError(
            "read_eval_metrics reads TensorBoard event files and needs the tensorboard "
            "package, a dependency of lightning_finalops that this environment lacks: "
            "pip install tensorboard"
        ) from e
    results: Dict[int, Dict[str, float]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(glob.escape(eval_dir), "events.out.tfevents.*"))):
        reader = PyRecordReader_New(path)
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            except errors.DataLossError as e:
                warnings.warn(
                    "Skipping rest of the file due to encountering data corruption error; "
                    f"file path: {path}; original error raised by the event file reader: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            event = event_pb2.Event.FromString(reader.record())
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    results[event.step][value.tag] = value.simple_value
    return collections.OrderedDict(sorted(results.items()))


def _history_source(eval_results: Any, eval_dir: Optional[str]) -> Callable[[], List[Any]]:
    """A reader of ``[(global step, {name: value})]`` for ``eval_results``/``eval_dir``."""
    if eval_results is None:
        if eval_dir is None:
            raise ValueError(
                "eval_dir must name a directory of TensorBoard event files when eval_results "
                "is None (TF's default, model_dir/eval, has no counterpart here)."
            )
        eval_dir = check_path(eval_dir, "eval_dir")
        return lambda: list(read_eval_metrics(eval_dir).items())
    if eval_dir is not None:
        raise ValueError(
            "Give eval_results (evaluations kept in memory) or eval_dir (event files), not both."
        )
    if isinstance(eval_results, FinalOpsHook):
        if not isinstance(eval_results.final_ops, Mapping):
            raise TypeError(
                "eval_results: the FinalOpsHook's final_ops must be a dict of named metrics "
                f"to stop on, got {describe(eval_results.final_ops)}."
            )
        return lambda: eval_results.final_ops_history
    if not hasattr(type(eval_results), "evaluation_history"):
        raise TypeError(
            "`eval_results` must be a FinalOpsHook, a HookCallback or an "
            f"InMemoryEvaluatorHook (or None with eval_dir). Got: {describe(eval_results)}"
        )
    check = getattr(eval_results, "check_evaluation_history", None)
    if callable(check):
        check("eval_results")  # e.g. a HookCallback with no evaluation to read
    return lambda: eval_results.evaluation_history


class _HostValues:
    """The evaluations as ``{step: {name: float}}``; each one brought to the host once.

    Recorded values are tensors on their device; a check brings the new ones to the host
    (one transfer each: the host waits for the device then) and reuses the earlier ones.
    """

    def __init__(self, read: Callable[[], List[Any]]) -> None:
        self._read = read
        # id(values) -> (values, {name: float}); the values are held so an id stays theirs
        self._converted: Dict[int, Tuple[Any, Dict[str, float]]] = {}

    def __call__(self) -> collections.OrderedDict[int, Dict[str, float]]:
        history = self._read()
        merged: Dict[int, Dict[str, float]] = {}
        converted: Dict[int, Tuple[Any, Dict[str, float]]] = {}
        for step, values in history:
            known = self._converted.get(id(values))
            if known is None or known[0] is not values:
                known = (values, _as_floats(values))
            converted[id(values)] = known
            merged.setdefault(int(step), {}).update(known[1])
        self._converted = converted
        return collections.OrderedDict(sorted(merged.items()))


class _NotScalar(str):
    """What an evaluation holds for a value that is not one number (its description)."""


def _as_floats(values: Any) -> Dict[str, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(
            "An evaluation's values must be a dict of named metrics for early stopping, got "
            f"{describe(values)}: give the FinalOpsHook a dict, e.g. FinalOpsHook({{'loss': "
            "metric}})."
        )
    scalars: Dict[str, Any] = {}
    others: Dict[str, Any] = {}
    for name, value in values.items():
        if is_scalar(value):
            scalars[str(name)] = value
        else:
            others[str(name)] = _NotScalar(describe(value))
    host = to_host(scalars)  # one transfer for the evaluation's tensors
    return {**others, **{name: float(value) for name, value in host.items()}}


# -- the predicates (TF's, exactly) ----------------------------------------------------------
def _metric(metrics: Mapping[str, float], metric_name: str, step: int,
            history: Mapping[int, Mapping[str, float]]) -> Optional[float]:
    """``metrics[metric_name]``; ``None`` if absent here but present in another evaluation."""
    if metric_name in metrics:
        value = metrics[metric_name]
        if isinstance(value, _NotScalar):
            raise TypeError(f"Metric {metric_name!r} at step {step} is not one number: {value}.")
        return value
    if any(metric_name in m for m in history.values()):
        return None  # this evaluation did not log it (another did): skipped
    names = sorted({name for m in history.values() for name in m})
    raise KeyError(
        f"Metric {metric_name!r} is in no evaluation (step {step} has {sorted(metrics)}; "
        f"all evaluations name {names})."
    )


def _stop_if_threshold_crossed(
    read: Callable[[], Mapping[int, Mapping[str, float]]], metric_name: str, threshold: float,
    min_steps: int, higher_is_better: bool,
) -> Callable[[], bool]:
    def stop_if_threshold_crossed() -> bool:
        history = read()
        for step, metrics in history.items():
            if step < min_steps:
                continue
            value = _metric(metrics, metric_name, step, history)
            if value is None:
                continue
            if (value > threshold) if higher_is_better else (value < threshold):
                logger.info(
                    'At step %s, metric "%s" has value %s which is %s the configured threshold '
                    "(%s) for early stopping.", step, metric_name, value,
                    "greater than" if higher_is_better else "less than", threshold,
                )
                return True
        return False

    return stop_if_threshold_crossed


def _stop_if_no_metric_improvement(
    read: Callable[[], Mapping[int, Mapping[str, float]]], metric_name: str,
    max_steps_without_improvement: int, min_steps: int, higher_is_better: bool,
) -> Callable[[], bool]:
    def stop_if_no_metric_improvement() -> bool:
        history = read()
        best: Optional[float] = None
        best_step = 0
        for step, metrics in history.items():
            if step < min_steps:
                continue
            value = _metric(metrics, metric_name, step, history)
            if value is None:
                continue
            if best is None or ((value > best) if higher_is_better else (value < best)):
                best, best_step = value, step
            if step - best_step >= max_steps_without_improvement:
                logger.info(
                    'No %s in metric "%s" for %s steps, which is greater than or equal to max '
                    "steps (%s) configured for early stopping.",
                    "increase" if higher_is_better else "decrease", metric_name,
                    step - best_step, max_steps_without_improvement,
                )
                return True
        return False

    return stop_if_no_metric_improvement


# -- the hook --------------------------------------------------------------------------------
class EarlyStoppingHook(SessionRunHook):
    """Calls ``should_stop_fn`` when its timer fires and stops the session when it is True.

    What :func:`make_early_stopping_hook` and the ``stop_if_*_hook`` functions return (TF's
    private ``_StopOnPredicateHook``); its :attr:`stopped` says whether it stopped training.

    The stop is the hook's state (TF's ``signal_early_stopping/STOP`` variable, which was
    checkpointed): a session restored from a checkpoint written after the stop stops at its
    creation and runs nothing, like a finished job. Each session starts unstopped (``begin``)
    unless a checkpoint restores the stop.

    With several ranks (a session whose ranks agree, ``session.agrees_across_ranks``) every
    rank calls ``should_stop_fn`` at the same global step (the timer reads the agreed clock)
    and a decision travels in the session's vote (a value summed over ranks, as TF's
    ``_MultiWorkerEarlyStoppingHook`` summed a flag), read at the next run: every rank then
    records the stop and stops after that run. So the checkpoint rank 0 writes holds the
    stop even when another rank decided it. Among ``MonitoredTrainingSession``'s
    ``chief_only_hooks`` the chief's decision stops every rank the same way.
    """

    def __init__(self, should_stop_fn: Callable[[], bool], run_every_secs: Optional[float],
                 run_every_steps: Optional[int], name: str) -> None:
        if not callable(should_stop_fn):
            raise TypeError("`should_stop_fn` must be callable.")
        if run_every_secs is not None and run_every_steps is not None:
            raise ValueError("Only one of `run_every_secs` and `run_every_steps` must be set.")
        if run_every_secs is not None:
            seconds = check_number(run_every_secs, "run_every_secs")
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError("run_every_secs must be a finite number of seconds >= 0 (0: "
                                 f"every run), got {run_every_secs!r}.")
            if seconds == 0:
                run_every_secs, run_every_steps = None, 1  # TF's 0 s: every run (new step)
        self._should_stop_fn = should_stop_fn
        self._timer = SecondOrStepTimer(
            every_secs=run_every_secs, every_steps=run_every_steps,
            secs_argument="run_every_secs", steps_argument="run_every_steps",
        )
        self._name = name
        self._stopped = False
        self._decided = AgreedValue()  # ranks that decided to stop, agreed a run later

    @property
    def stopped(self) -> bool:
        """Whether the early stop was requested (or restored from a checkpoint)."""
        return self._stopped

    @property
    def state_key(self) -> str:
        """``EarlyStopping[<what it stops on>]``, from its arguments, not its list position."""
        return f"EarlyStopping[{self._name}]"

    def agreement(self) -> Agreement:
        """A stop decided on some ranks, the ranks that decided it, and the clock if timed."""
        return Agreement(stop=True, time=self._timer.uses_time, values=(self._decided,))

    def begin(self) -> None:
        """A new session: unstopped, and its first run checks (TF's timer fires first)."""
        self._timer.reset()
        self._stopped = False

    def job_finished(self, global_step: int) -> bool:
        """Whether it was restored stopped: the job stopped early and is finished."""
        return self._stopped

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Record a stop the ranks agreed on; check when the timer fires."""
        global_step = run_context.session.global_step
        if self._decided.agreed:
            self._stopped = True  # a rank decided it a run ago: every rank stops after this run
        if not self._timer.should_trigger_for_step(global_step):
            return
        self._timer.update_last_triggered_step(global_step)
        if not self._should_stop_fn():
            return
        logger.info("Requesting early stopping at global step %d", global_step)
        if run_context.session.agrees_across_ranks:
            # the request stops every rank after the next run; every rank's copy of this
            # hook reads the decision then, so the checkpoint of any rank holds the stop
            self._decided.post(1.0)
            run_context.request_stop()
        else:
            self._stopped = True
            run_context.request_stop(rank_consistent=True)

    def end(self, session: Optional[RawSession]) -> None:
        """Record a stop the ranks agreed on in the last run (the session read its vote)."""
        if self._decided.agreed:
            self._stopped = True

    def state_dict(self) -> Dict[str, Any]:
        """``{"stop": bool}``, so a resumed job that had stopped stays stopped."""
        return {"stop": self._stopped}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the stop."""
        if set(state_dict) != {"stop"} or not isinstance(state_dict["stop"], bool):
            raise ValueError(
                f"{self.state_key} expects the state {{'stop': bool}}, got {dict(state_dict)!r}."
            )
        self._stopped = state_dict["stop"]


def refuse_in_evaluation(hooks: Sequence[SessionRunHook], argument: str) -> None:
    """Refuse an early-stopping hook among evaluation hooks: there it stops no training.

    Raises:
        ValueError: ``hooks[i]`` is an :class:`EarlyStoppingHook`.
    """
    for i, hook in enumerate(hooks):
        if isinstance(hook, EarlyStoppingHook):
            raise ValueError(
                f"{argument}[{i}] is an early-stopping hook ({type(hook).__name__}): among "
                "evaluation hooks it could only cut an evaluation short while training runs "
                "on. Put it with the training hooks (HookCallback(training_hooks=...), the "
                "MonitoredSession's hooks): it reads the evaluations' results (an evaluator's "
                "history, or eval_dir) and stops training, as in TF."
            )


def make_early_stopping_hook(
    should_stop_fn: Callable[[], bool],
    run_every_secs: Optional[float] = 60,
    run_every_steps: Optional[int] = None,
) -> EarlyStoppingHook:
    """A hook that stops training when ``should_stop_fn()`` returns True.

    TF's ``make_early_stopping_hook`` without its ``estimator`` argument. ``should_stop_fn``
    is called in the ``after_run`` of the first run, then whenever ``run_every_secs`` (on the
    agreed clock, :mod:`lightning_finalops.hooks.timers`) or ``run_every_steps`` global steps
    have passed since the last call.

    Args:
        should_stop_fn: a callable of no arguments returning a bool.
        run_every_secs: seconds between calls (``0``: every run); set it to ``None`` to use
            ``run_every_steps``.
        run_every_steps: global steps between calls.

    Returns:
        A training hook, for ``MonitoredSession(hooks=[...])`` or
        ``HookCallback(training_hooks=[...])``.

    Raises:
        TypeError: ``"`should_stop_fn` must be callable."``
        ValueError: ``"Only one of `run_every_secs` and `run_every_steps` must be set."``,
            neither is set (the timer's ``"Either every_secs or every_steps should be
            provided."``), or a negative period.
    """
    name = getattr(should_stop_fn, "__qualname__", type(should_stop_fn).__qualname__)
    return EarlyStoppingHook(should_stop_fn, run_every_secs, run_every_steps, name)


def _check_threshold(threshold: Any) -> float:
    value = check_number(threshold, "threshold")
    if math.isnan(value):
        raise ValueError("threshold must be a number, got nan (no metric value crosses it).")
    return value


def _predicate_hook(
    kind: str, eval_results: Any, metric_name: str, eval_dir: Optional[str],
    run_every_secs: Optional[float], run_every_steps: Optional[int],
    make: Callable[[Callable[[], Any]], Callable[[], bool]], arguments: str,
) -> EarlyStoppingHook:
    if not isinstance(metric_name, str):
        raise TypeError(f"metric_name must be a str, got {describe(metric_name)}.")
    if not metric_name:
        raise ValueError("metric_name must be a non-empty str, got ''.")
    read = _HostValues(_history_source(eval_results, eval_dir))
    return EarlyStoppingHook(make(read), run_every_secs, run_every_steps,
                                f"{kind}:{metric_name}:{arguments}")


def stop_if_higher_hook(
    eval_results: Any,
    metric_name: str,
    threshold: float,
    eval_dir: Optional[str] = None,
    min_steps: int = 0,
    run_every_secs: Optional[float] = 60,
    run_every_steps: Optional[int] = None,
) -> EarlyStoppingHook:
    """Stop once an evaluation's ``metric_name`` is strictly higher than ``threshold``.

    Args:
        eval_results: where the evaluations come from: a ``FinalOpsHook`` (whose
            ``final_ops`` is a dict; one that is also a training hook records at the end of
            each fit too, so pass its ``HookCallback`` instead), a ``HookCallback`` or an
            ``InMemoryEvaluatorHook`` (their ``evaluation_history``), or ``None`` to read
            ``eval_dir``. A ``FinalOpsHook(max_history=N)`` shows the predicates its last N
            evaluations only.
        metric_name: the metric's name in each evaluation's dict (a TensorBoard tag with
            ``eval_dir``).
        threshold: the threshold.
        eval_dir: a directory of TensorBoard event files (with ``eval_results=None``).
        min_steps: evaluations at global steps below it are ignored.
        run_every_secs: seconds between checks (``0``: every run; ``None`` to use
            ``run_every_steps``).
        run_every_steps: global steps between checks.

    Returns:
        The training hook (its ``stopped`` tells whether it stopped the training).

    Raises:
        TypeError: ``eval_results`` is none of the sources, its values are not a dict, or an
            argument has the wrong type.
        ValueError: both or neither of the timer arguments, neither or both of
            ``eval_results`` and ``eval_dir``, a ``HookCallback`` with no ``FinalOpsHook`` in
            its evaluations, or a value out of range.
        KeyError: (at a check) ``metric_name`` is in no evaluation.
    """
    threshold = _check_threshold(threshold)
    min_steps = check_int(min_steps, "min_steps", minimum=0)
    return _predicate_hook(
        "higher", eval_results, metric_name, eval_dir, run_every_secs, run_every_steps,
        lambda read: _stop_if_threshold_crossed(read, metric_name, threshold, min_steps, True),
        f"threshold={threshold},min_steps={min_steps}",
    )


def stop_if_lower_hook(
    eval_results: Any,
    metric_name: str,
    threshold: float,
    eval_dir: Optional[str] = None,
    min_steps: int = 0,
    run_every_secs: Optional[float] = 60,
    run_every_steps: Optional[int] = None,
) -> EarlyStoppingHook:
    """Stop once an evaluation's ``metric_name`` is strictly lower than ``threshold``.

    Args:
        eval_results: where the evaluations come from: a ``FinalOpsHook`` (whose
            ``final_ops`` is a dict; one that is also a training hook records at the end of
            each fit too, so pass its ``HookCallback`` instead), a ``HookCallback`` or an
            ``InMemoryEvaluatorHook`` (their ``evaluation_history``), or ``None`` to read
            ``eval_dir``. A ``FinalOpsHook(max_history=N)`` shows the predicates its last N
            evaluations only.
        metric_name: the metric's name in each evaluation's dict (a TensorBoard tag with
            ``eval_dir``).
        threshold: the threshold.
        eval_dir: a directory of TensorBoard event files (with ``eval_results=None``).
        min_steps: evaluations at global steps below it are ignored.
        run_every_secs: seconds between checks (``0``: every run; ``None`` to use
            ``run_every_steps``).
        run_every_steps: global steps between checks.

    Returns:
        The training hook (its ``stopped`` tells whether it stopped the training).

    Raises:
        TypeError: ``eval_results`` is none of the sources, its values are not a dict, or an
            argument has the wrong type.
        ValueError: both or neither of the timer arguments, neither or both of
            ``eval_results`` and ``eval_dir``, a ``HookCallback`` with no ``FinalOpsHook`` in
            its evaluations, or a value out of range.
        KeyError: (at a check) ``metric_name`` is in no evaluation.
    """
    threshold = _check_threshold(threshold)
    min_steps = check_int(min_steps, "min_steps", minimum=0)
    return _predicate_hook(
        "lower", eval_results, metric_name, eval_dir, run_every_secs, run_every_steps,
        lambda read: _stop_if_threshold_crossed(read, metric_name, threshold, min_steps, False),
        f"threshold={threshold},min_steps={min_steps}",
    )


def stop_if_no_increase_hook(
    eval_results: Any,
    metric_name: str,
    max_steps_without_increase: int,
    eval_dir: Optional[str] = None,
    min_steps: int = 0,
    run_every_secs: Optional[float] = 60,
    run_every_steps: Optional[int] = None,
) -> EarlyStoppingHook:
    """Stop once ``metric_name`` has not increased for ``max_steps_without_increase`` steps.

    The steps are evaluation global steps: at some evaluation, ``its step - the step of the
    best evaluation so far >= max_steps_without_increase`` (an equal value is no increase).

    Args:
        eval_results: where the evaluations come from: a ``FinalOpsHook`` (whose
            ``final_ops`` is a dict; one that is also a training hook records at the end of
            each fit too, so pass its ``HookCallback`` instead), a ``HookCallback`` or an
            ``InMemoryEvaluatorHook`` (their ``evaluation_history``), or ``None`` to read
            ``eval_dir``. A ``FinalOpsHook(max_history=N)`` shows the predicates its last N
            evaluations only.
        metric_name: the metric's name in each evaluation's dict (a TensorBoard tag with
            ``eval_dir``).
        max_steps_without_increase: evaluation steps without an increase that stop.
        eval_dir: a directory of TensorBoard event files (with ``eval_results=None``).
        min_steps: evaluations at global steps below it are ignored.
        run_every_secs: seconds between checks (``0``: every run; ``None`` to use
            ``run_every_steps``).
        run_every_steps: global steps between checks.

    Returns:
        The training hook (its ``stopped`` tells whether it stopped the training).

    Raises:
        TypeError: ``eval_results`` is none of the sources, its values are not a dict, or an
            argument has the wrong type.
        ValueError: both or neither of the timer arguments, neither or both of
            ``eval_results`` and ``eval_dir``, a ``HookCallback`` with no ``FinalOpsHook`` in
            its evaluations, or a value out of range.
        KeyError: (at a check) ``metric_name`` is in no evaluation.
    """
    steps = check_int(max_steps_without_increase, "max_steps_without_increase", minimum=0)
    min_steps = check_int(min_steps, "min_steps", minimum=0)
    return _predicate_hook(
        "no_increase", eval_results, metric_name, eval_dir, run_every_secs, run_every_steps,
        lambda read: _stop_if_no_metric_improvement(read, metric_name, steps, min_steps, True),
        f"max_steps={steps},min_steps={min_steps}",
    )


def stop_if_no_decrease_hook(
    eval_results: Any,
    metric_name: str,
    max_steps_without_decrease: int,
    eval_dir: Optional[str] = None,
    min_steps: int = 0,
    run_every_secs: Optional[float] = 60,
    run_every_steps: Optional[int] = None,
) -> EarlyStoppingHook:
    """Stop once ``metric_name`` has not decreased for ``max_steps_without_decrease`` steps.

    As :func:`stop_if_no_increase_hook`, for a metric that should go down (a loss).

    Args:
        eval_results: where the evaluations come from: a ``FinalOpsHook`` (whose
            ``final_ops`` is a dict; one that is also a training hook records at the end of
            each fit too, so pass its ``HookCallback`` instead), a ``HookCallback`` or an
            ``InMemoryEvaluatorHook`` (their ``evaluation_history``), or ``None`` to read
            ``eval_dir``. A ``FinalOpsHook(max_history=N)`` shows the predicates its last N
            evaluations only.
        metric_name: the metric's name in each evaluation's dict (a TensorBoard tag with
            ``eval_dir``).
        max_steps_without_decrease: evaluation steps without a decrease that stop.
        eval_dir: a directory of TensorBoard event files (with ``eval_results=None``).
        min_steps: evaluations at global steps below it are ignored.
        run_every_secs: seconds between checks (``0``: every run; ``None`` to use
            ``run_every_steps``).
        run_every_steps: global steps between checks.

    Returns:
        The training hook (its ``stopped`` tells whether it stopped the training).

    Raises:
        TypeError: ``eval_results`` is none of the sources, its values are not a dict, or an
            argument has the wrong type.
        ValueError: both or neither of the timer arguments, neither or both of
            ``eval_results`` and ``eval_dir``, a ``HookCallback`` with no ``FinalOpsHook`` in
            its evaluations, or a value out of range.
        KeyError: (at a check) ``metric_name`` is in no evaluation.
    """
    steps = check_int(max_steps_without_decrease, "max_steps_without_decrease", minimum=0)
    min_steps = check_int(min_steps, "min_steps", minimum=0)
    return _predicate_hook(
        "no_decrease", eval_results, metric_name, eval_dir, run_every_secs, run_every_steps,
        lambda read: _stop_if_no_metric_improvement(read, metric_name, steps, min_steps, False),
        f"max_steps={steps},min_steps={min_steps}",
    )
