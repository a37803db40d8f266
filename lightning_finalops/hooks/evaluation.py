"""``InMemoryEvaluatorHook``: evaluate inside a training loop, on the live weights."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from lightning_finalops.engine import Engine
from lightning_finalops.evaluation_loop import (
    EvaluationMetrics,
    hooks_final_ops,
    metrics_reached,
    modules_of,
    run_evaluation,
)
from lightning_finalops.fetches import is_scalar, to_host
from lightning_finalops.hook_state import check_hooks, latest_results, new_results
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.hooks.early_stopping import refuse_in_evaluation
from lightning_finalops.hooks.summary import SummaryWriterCache
from lightning_finalops.hooks.timers import SecondOrStepTimer
from lightning_finalops.session_run_hook import (
    Agreement,
    Coordinator,
    RawSession,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.validation import check_int, check_path, describe, is_int

__all__ = ["InMemoryEvaluatorHook"]

logger = logging.getLogger("lightning_finalops")


class _EvaluationEngine(Engine):
    """The engine of one evaluation: the training step fixed, the training modules."""

    hook_attributes = ("modules",)

    def __init__(self, training: RawSession, global_step: int, modules: Any) -> None:
        self._training = training
        self._global_step = global_step
        self.modules = modules

    @property
    def global_step(self) -> int:
        """The training global step being evaluated; it does not advance."""
        return self._global_step

    @property
    def is_chief(self) -> bool:
        """The training session's chief."""
        return self._training.is_chief

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """The training session's loggers."""
        self._training.log_metrics(metrics, step)


class InMemoryEvaluatorHook(SessionRunHook):
    """Evaluates on the live weights during training, without a checkpoint (TF's hook).

    An evaluation runs ``eval_step(batch)`` over a fresh ``input_fn()`` (at most ``steps``
    batches), with the modules in eval mode under ``torch.no_grad()``; they go back to their
    modes afterwards, on the weights as they are. It happens once in
    ``after_create_session`` (before training), then whenever ``every_n_iter`` runs of this
    session have passed since the last one, and at ``end`` (TF's schedule: with 10 runs and
    ``every_n_iter=4``, at global steps 0, 4, 8 and 10).

    Each evaluation is a full session for ``hooks``: ``begin``, ``after_create_session``,
    ``before_run``/``after_run`` per batch, ``end``, with TF's order, stop and exception
    rules, and their raw session's ``global_step`` fixed at the training step evaluated. A
    hook's ``request_stop()`` ends that evaluation after the current batch, and so does the
    end of the data (a ``StopIteration`` from ``eval_step`` too: it never reaches the training
    loop; one raised by a hook is a ``RuntimeError``). The torchmetrics metrics the
    evaluation's values come from (the final ops of ``hooks``, also inside the functions
    they fetch, and the metrics ``eval_step`` holds in its closure or names as globals) are
    reset when each evaluation starts, as TF's evaluation started from fresh metric
    variables, if an evaluation updated them and nothing else did since. The metrics of
    ``modules`` are never reset (a training metric of the same model stays whole); one that
    accumulates across evaluations is named in a warning. ``MaxMetric``, ``MinMetric`` and
    ``MetricTracker`` keep values across evaluations by design and are never touched.

    The results of an evaluation are ``{name: value}``: the mean over its batches of every
    scalar tensor or number in the dict ``eval_step`` returns (kept on the device: no host
    sync), then the results each hook of ``hooks`` recorded in it
    (:meth:`~lightning_finalops.SessionRunHook.latest_results`: a ``FinalOpsHook`` whose final
    ops are a dict; they win a name clash). ``evaluation_history`` keeps
    ``(global step, results)`` for every evaluation (unbounded: return scalars), is the
    hook's checkpointed state, and is what the early-stopping hooks read when given this hook.
    The state of ``hooks`` is not checkpointed (each evaluation is a fresh session for them).
    With ``output_dir``, the chief also writes the scalar results to TensorBoard in
    ``output_dir/eval`` (``eval_<name>``) at the global step, for
    ``stop_if_*_hook(eval_dir=...)`` and TensorBoard.

    Many processes: every rank evaluates (the schedule is the same on every rank); give each
    rank its shard in ``input_fn`` and use torchmetrics, whose ``compute()`` reduces across
    ranks, so every rank gets the same results. Plain tensors returned by ``eval_step`` are
    averaged per rank, not across ranks.

    Args:
        eval_step: called as ``eval_step(batch)`` (with the evaluation's str feeds as keyword
            arguments it accepts); it may return a dict, whose names the hooks' fetches can
            name.
        input_fn: called with no argument at each evaluation; returns an iterable of batches.
        steps: evaluate at most this many batches (``None``: until ``input_fn``'s iterable
            ends).
        hooks: the evaluation hooks (e.g. a ``FinalOpsHook`` over torchmetrics metrics).
        name: the evaluation's name: results go to ``eval_<name>`` rather than ``eval``.
        every_n_iter: evaluate every N runs of the training session.
        modules: the module(s) to put in eval mode; by default the training session's
            (``MonitoredSession(modules=...)``, or Lightning's ``pl_module``).
        output_dir: write scalar results as TensorBoard summaries under it (chief only).

    Raises:
        ValueError: ``invalid every_n_iter=...`` or ``Must specify steps > 0, given: ...``
            (TF's messages), an empty ``name``, one hook listed twice, or an early-stopping
            hook among ``hooks`` (it stops training: it belongs with the training hooks).
        TypeError: ``Hooks must be a SessionRunHook, given: ...`` (TF's message),
            ``eval_step``/``input_fn`` not callable, a non-int ``every_n_iter``/``steps``, a
            non-str ``name``, or ``modules`` that are not modules.
    """

    def __init__(
        self,
        eval_step: Callable[..., Any],
        input_fn: Callable[[], Iterable[Any]],
        steps: Optional[int] = None,
        hooks: Optional[Iterable[SessionRunHook]] = None,
        name: Optional[str] = None,
        every_n_iter: int = 100,
        *,
        modules: Any = None,
        output_dir: Optional[str] = None,
    ) -> None:
        if every_n_iter is None or (is_int(every_n_iter) and every_n_iter <= 0):
            raise ValueError(f"invalid every_n_iter={every_n_iter}.")  # TF's message
        check_int(every_n_iter, "every_n_iter")
        if steps is not None and is_int(steps) and steps <= 0:
            raise ValueError(f"Must specify steps > 0, given: {steps}")  # TF's message
        check_int(steps, "steps", allow_none=True)
        if not callable(eval_step):
            raise TypeError(f"eval_step must be callable, got {describe(eval_step)}.")
        if not callable(input_fn):
            raise TypeError(f"input_fn must be callable, got {describe(input_fn)}.")
        if isinstance(hooks, (list, tuple)):
            for hook in hooks:
                if not isinstance(hook, SessionRunHook):
                    raise TypeError(f"Hooks must be a SessionRunHook, given: {hook}")  # TF's
        hooks = list(check_hooks(() if hooks is None else hooks, "hooks"))
        refuse_in_evaluation(hooks, "hooks")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {describe(name)}.")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''.")
        if modules is not None:
            modules_of(modules, "modules")
        self._eval_step = eval_step
        self._metrics = EvaluationMetrics(type(self).__name__)
        self._input_fn = input_fn
        self._steps = None if steps is None else int(steps)
        self._hooks = hooks
        self._name = name
        self._every_n_iter = int(every_n_iter)
        self._modules = modules
        output_dir = check_path(output_dir, "output_dir", allow_none=True)
        self._eval_dir = (
            None if output_dir is None
            else os.path.join(output_dir, "eval" if not name else "eval_" + name)
        )
        self._timer = SecondOrStepTimer(every_steps=every_n_iter)
        self._iter_count = 0
        self._history: List[Tuple[int, Dict[str, Any]]] = []

    def agreement(self) -> Agreement:
        """Nothing to agree on: it evaluates every N steps, the same steps on every rank."""
        return Agreement()

    @property
    def eval_dir(self) -> Optional[str]:
        """``output_dir/eval`` (or ``eval_<name>``), where the results go; ``None``: nowhere."""
        return self._eval_dir

    @property
    def hooks(self) -> List[SessionRunHook]:
        """The evaluation hooks."""
        return self._hooks

    @property
    def evaluation_history(self) -> List[Tuple[int, Dict[str, Any]]]:
        """``[(global step, {name: value})]``, one entry per evaluation, oldest first."""
        return self._history

    @property
    def state_key(self) -> str:
        """``InMemoryEvaluatorHook`` or ``InMemoryEvaluatorHook[<name>]``."""
        return "InMemoryEvaluatorHook" + (f"[{self._name}]" if self._name else "")

    def state_dict(self) -> Dict[str, Any]:
        """The evaluation history, so a resumed run keeps the evaluations before it."""
        return {"evaluation_history": list(self._history)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the evaluation history."""
        if set(state_dict) != {"evaluation_history"}:
            raise ValueError(
                f"{self.state_key}.load_state_dict expects {{'evaluation_history': [...]}}, "
                f"got keys {sorted(state_dict)}."
            )
        self._history = [(int(step), dict(values))
                         for step, values in state_dict["evaluation_history"]]

    # -- the training session's hook methods -----------------------------------------------
    def begin(self) -> None:
        """Reset the schedule: this session's runs are counted from 0."""
        self._timer.reset()
        self._iter_count = 0

    def after_create_session(self, session: RawSession, coord: Coordinator) -> None:
        """Evaluate once, before training.

        Raises:
            ValueError: no module to evaluate is known: neither ``modules=`` here nor the
                training session's modules (an evaluation runs in eval mode, so it needs
                them).
        """
        if not modules_of(self._modules_in(session), "the session's modules"):
            raise ValueError(
                f"{self.state_key} evaluates in eval mode under torch.no_grad(), and knows no "
                "module to put in eval mode: pass modules= to it, or to the session "
                "(MonitoredSession(modules=...))."
            )
        self._evaluate(session)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Count the run; evaluate when ``every_n_iter`` runs passed since the last one."""
        self._iter_count += 1
        if self._timer.should_trigger_for_step(self._iter_count):
            self._evaluate(run_context.session)

    def end(self, session: Optional[RawSession]) -> None:
        """Evaluate the final weights."""
        if session is not None:
            self._evaluate(session)

    # -- one evaluation ----------------------------------------------------------------------
    def _modules_in(self, training: RawSession) -> Any:
        """``modules=``, else the training session's modules."""
        if self._modules is not None:
            return self._modules
        return getattr(training, "modules", None)

    def _evaluate(self, training: RawSession) -> None:
        modules = self._modules_in(training)
        global_step = training.global_step
        engine = _EvaluationEngine(training, global_step, modules)
        listed = modules_of(modules, "the session's modules")
        read = metrics_reached(*hooks_final_ops(self._hooks))
        self._metrics.start(metrics_reached(*read, self._eval_step), metrics_reached(*listed),
                            read)
        before = latest_results(self._hooks)
        sums: Dict[str, Any] = {}
        counts: Dict[str, int] = {}

        def accumulate(outputs: Any) -> None:
            if isinstance(outputs, Mapping):
                _accumulate(sums, counts, outputs)

        run_evaluation(
            HookedSession(self._hooks, engine, "hooks"), self._eval_step, self._input_fn(),
            listed, max_batches=self._steps, on_outputs=accumulate,
        )
        self._metrics.end()
        results: Dict[str, Any] = {name: total / counts[name] for name, total in sums.items()}
        for _, (_, recorded) in new_results(self._hooks, before):  # recorded in this one
            results.update(recorded)
        self._history.append((global_step, results))
        self._timer.update_last_triggered_step(self._iter_count)
        if logger.isEnabledFor(logging.INFO):  # printing device values waits for them
            logger.info("Saving dict for global step %d: %s", global_step, _describe(results))
        if self._eval_dir is not None and training.is_chief:
            self._write_summary(results, global_step)

    def _write_summary(self, results: Mapping[str, Any], global_step: int) -> None:
        assert self._eval_dir is not None
        writer = SummaryWriterCache.get(self._eval_dir)
        for name, value in to_host(results).items():  # one transfer for all of them
            if is_scalar(value):
                writer.add_scalar(name, float(value), global_step)
        writer.flush()


def _accumulate(sums: Dict[str, Any], counts: Dict[str, int],
                outputs: Mapping[str, Any]) -> None:
    for name, value in outputs.items():
        if not is_scalar(value):
            continue
        if isinstance(value, torch.Tensor):
            # a copy: the step may update the tensor it returned in place at the next batch
            value = value.detach().float().reshape(()).clone()
        key = str(name)
        sums[key] = sums[key] + value if key in sums else value
        counts[key] = counts.get(key, 0) + 1


def _describe(results: Mapping[str, Any]) -> str:
    host = to_host(dict(results))
    shown = {name: float(value) if isinstance(value, torch.Tensor) and is_scalar(value)
             else value for name, value in host.items()}
    return ", ".join(f"{name} = {value}" for name, value in sorted(shown.items()))
