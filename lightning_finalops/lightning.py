"""``HookCallback``: session hooks inside ``Trainer.fit/validate/test/predict``.

This is the only module that imports Lightning. One class serves both packages: it subclasses
the ``Callback`` of ``pytorch_lightning`` and, when installed, of ``lightning.pytorch``.

| session | begin | after_create_session | before_run/after_run | end |
|---|---|---|---|---|
| training (fit) | setup("fit") | on_train_start | train batch start/end | on_train_end |
| evaluation | on_validation_start, on_test_start | same | batch start/end | on_*_end |
| prediction | on_predict_start | same | batch start/end | on_predict_end |
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import pytorch_lightning
import torch.distributed as dist

from lightning_finalops.checkpoints import atomic_write
from lightning_finalops.distributed import RankAgreement
from lightning_finalops.engine import Engine
from lightning_finalops.evaluation_loop import EvaluationMetrics, hooks_final_ops, metrics_reached
from lightning_finalops.hook_state import (
    check_hooks,
    has_state,
    hook_state_dict,
    hook_state_keys,
    latest_results,
    load_hook_state_dict,
    new_results,
)
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.hooks.early_stopping import refuse_in_evaluation
from lightning_finalops.hooks.final_ops import FinalOpsHook, ResultsExportHook
from lightning_finalops.run import PendingRun
from lightning_finalops.session_run_hook import SessionRunHook
from lightning_finalops.validation import check_bool, check_seconds, describe

try:  # the unified package is optional; its Callback is a distinct class
    import lightning.pytorch as _lightning_pytorch
except ImportError:  # pragma: no cover - exercised only without the optional package
    _lightning_pytorch = None

__all__ = ["HookCallback"]

logger = logging.getLogger("lightning_finalops")

_CALLBACK_BASES: Tuple[type, ...] = (pytorch_lightning.Callback,) + (
    (_lightning_pytorch.Callback,) if _lightning_pytorch is not None else ()
)

TRAINING, EVALUATION, PREDICTION = "training", "evaluation", "prediction"


class _LightningEngine(Engine):
    """The engine of a Lightning session: the hooks' raw session inside a ``Trainer``.

    Its named values are ``trainer.callback_metrics`` (at the end of a validation: that
    validation's aggregated values), read only when a lookup reaches them (see
    :mod:`lightning_finalops.raw_session` for the order).
    """

    str_feeds_as_keywords = False  # HookCallback sets them on the batch
    hook_attributes = ("trainer", "pl_module", "modules")

    def __init__(self, trainer: Any, pl_module: Any) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self._world_size: int = trainer.world_size

    @property
    def global_step(self) -> int:
        """``trainer.global_step``; it does not advance during an evaluation or prediction."""
        return int(self.trainer.global_step)

    @property
    def modules(self) -> Any:
        """The LightningModule."""
        return self.pl_module

    @property
    def is_chief(self) -> bool:
        """Whether this process is global rank 0."""
        return bool(self.trainer.is_global_zero)

    def named_values(self) -> Mapping[str, Any]:
        """``trainer.callback_metrics``."""
        return self.trainer.callback_metrics

    def rank_agreement(self, values: int, timeout: float,
                       name: str) -> Optional[RankAgreement]:
        """Over every rank of the trainer (a gloo group), when there are several.

        ``None`` also when ``torch.distributed`` is not initialized (a strategy whose ranks
        do not form a ``torch.distributed`` group, such as XLA's): nothing to agree over.
        """
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            return RankAgreement(values, timeout=timeout, name=name)
        return None

    def checkpointed_state(self) -> Any:
        """Every callback's state (a Lightning checkpoint holds each, not only this one's)."""
        return [callback.state_dict() for callback in self.trainer.callbacks]

    @property
    def step_final_after_run(self) -> bool:
        """Whether no validation follows the batch that just ended (asked at its end).

        Then a checkpoint asked for in the batch is written at its end, where Lightning's
        own checkpoints are (a resumable data loader resumes exactly from there); else
        after that validation, at ``on_validation_end``, so it holds what the validation
        recorded. Lightning has no public API for this: the fit loop's own test is asked,
        and without it (another Lightning) the checkpoint is written at the batch end.
        """
        fit_loop = self.trainer.fit_loop
        try:
            follows = fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)
        except Exception:  # noqa: BLE001 - internals of another Lightning version
            return True
        return not follows

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Send scalars to every logger of the trainer, on global rank 0 only."""
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(dict(metrics), step=step)

    def write_checkpoint(self, path: str) -> None:
        """``trainer.save_checkpoint`` (every rank calls it), made atomic by rank 0's rename.

        The checkpoint is a Lightning checkpoint: ``fit(ckpt_path=path)`` resumes from it,
        hooks' state included. Every rank writes to the same temporary name (DDP writes a
        file from rank 0; sharded strategies write a directory from every rank), then rank 0
        renames it to ``path``.
        """
        tmp = path + ".tmp"
        # a full checkpoint (callbacks, optimizers, loops), said explicitly: Lightning logs a
        # line at every save that leaves weights_only unset
        save = functools.partial(self.trainer.save_checkpoint, weights_only=False)
        if self.trainer.is_global_zero:
            atomic_write(path, save, tmp=tmp)
        else:
            save(tmp)  # a collective: returns once every rank wrote
        # every rank returns once the checkpoint is in place under its final name
        self.trainer.strategy.barrier("lightning_finalops.save_checkpoint")


def _raise_sigterm_exception(trainer: Any) -> None:
    """Raise the ``SIGTERMException`` of the trainer's Lightning, as its loops do on SIGTERM."""
    if type(trainer).__module__.startswith("pytorch_lightning"):
        from pytorch_lightning.utilities.exceptions import SIGTERMException
    else:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    raise SIGTERMException


def _feed_batch(session: HookedSession, pending: PendingRun, batch: Any) -> None:
    """Set the run's str feeds on the batch (a mapping), or abort the run.

    Raises:
        TypeError: the batch is not a mutable mapping.
    """
    if not isinstance(batch, MutableMapping):
        session.abort_run()
        raise TypeError(
            f"Hooks fed {sorted(pending.str_feeds)} (str feed keys), which HookCallback "
            f"sets on the batch, but the batch is a {type(batch).__name__}: return a "
            "dict from the dataloader (or collate_fn) to use str feeds."
        )
    batch.update(pending.str_feeds)


class HookCallback(*_CALLBACK_BASES):  # type: ignore[misc]
    """Runs TensorFlow-style session hooks inside a Lightning ``Trainer``.

    Each ``fit`` is a training session, each validation run (inside ``fit`` or
    ``Trainer.validate``) and each ``Trainer.test`` an evaluation session, each
    ``Trainer.predict`` a prediction session, as ``Estimator.train/evaluate/predict`` built
    one ``MonitoredSession`` each. Hook fetches that are names resolve against the step's
    returned dict, then ``trainer.callback_metrics``; feeds with str keys are set on a
    mapping batch before the step; tensor feeds override the tensor for that batch.

    A hook that calls ``request_stop()`` stops ``fit`` after the current batch (agreed across
    ranks), or ends the current evaluation/prediction after the current batch. On an
    exception no hook's ``end()`` runs (TF's rule). The hooks' state goes into Lightning
    checkpoints and is restored on ``fit(ckpt_path=...)`` before ``after_create_session``.

    Args:
        training_hooks: hooks of each ``fit`` (``EstimatorSpec.training_hooks``).
        evaluation_hooks: hooks of each validation and test run (``evaluation_hooks``).
        prediction_hooks: hooks of each ``predict`` (``prediction_hooks``).
        final_ops: the common case in one argument: a :class:`FinalOpsHook` over these
            fetches (for example metric names ``{"acc": "val_acc", "loss": "val_loss"}``) is
            added to both the training and the evaluation hooks, so its
            ``final_ops_history`` holds the values at the end of every validation and of
            ``fit``; it is :attr:`final_ops_hook`.
        include_sanity_check: make Lightning's sanity-check validation a session too.
        log_final_ops: write each evaluation's ``FinalOpsHook`` values (scalars) to the
            trainer's loggers under ``"final_ops/<val|test>/<key>"``, on global rank 0, at
            the trainer's global step (as ``Estimator.evaluate`` wrote its summary).
        name: distinguishes two ``HookCallback`` s in one trainer (it becomes part of
            :attr:`state_key`, which Lightning requires to be unique).
        agreement_timeout: under DDP, the seconds any wait of the training session's
            agreement may last before it fails with an
            :class:`~lightning_finalops.AgreementTimeoutError` naming the ranks that did
            not answer.

    Evaluations: with evaluation hooks, the torchmetrics metrics their final ops read
    (directly, or inside the functions they fetch) are reset when each validation or test
    starts, the sanity check's included, as TF re-initialised metric variables, if an
    evaluation updated them and nothing else did since. The LightningModule's other metrics
    are never reset (a metric logged with ``self.log(name, metric)`` is Lightning's to reset;
    a training metric is left alone); one that accumulates across evaluations is named in a
    warning. ``MaxMetric``, ``MinMetric`` and ``MetricTracker`` keep values across
    evaluations by design and are never touched.

    Raises:
        TypeError: a hook list holds something else than :class:`SessionRunHook`, or
            ``final_ops`` is not a valid fetch structure.
        ValueError: an early-stopping hook is among ``evaluation_hooks`` or
            ``prediction_hooks`` (it stops training: it belongs in ``training_hooks``), or
            two stateful hooks share a state key.
    """

    def __init__(
        self,
        training_hooks: Sequence[SessionRunHook] = (),
        evaluation_hooks: Sequence[SessionRunHook] = (),
        prediction_hooks: Sequence[SessionRunHook] = (),
        *,
        final_ops: Any = None,
        include_sanity_check: bool = False,
        log_final_ops: bool = True,
        name: Optional[str] = None,
        agreement_timeout: float = 300.0,
    ) -> None:
        training = list(check_hooks(training_hooks, "training_hooks"))
        evaluation = list(check_hooks(evaluation_hooks, "evaluation_hooks"))
        prediction = list(check_hooks(prediction_hooks, "prediction_hooks"))
        refuse_in_evaluation(evaluation, "evaluation_hooks")
        refuse_in_evaluation(prediction, "prediction_hooks")
        self.final_ops_hook: Optional[FinalOpsHook] = None
        if final_ops is not None:
            self.final_ops_hook = FinalOpsHook(final_ops)
            training.append(self.final_ops_hook)
            evaluation.append(self.final_ops_hook)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {describe(name)}.")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''.")
        self.training_hooks = training
        self.evaluation_hooks = evaluation
        self.prediction_hooks = prediction
        self.include_sanity_check = check_bool(include_sanity_check, "include_sanity_check")
        self.log_final_ops = check_bool(log_final_ops, "log_final_ops")
        self.name = name
        self.agreement_timeout = check_seconds(agreement_timeout, "agreement_timeout")
        self._sessions: Dict[str, HookedSession] = {}
        # the metrics of the model and the evaluation hooks' final ops, reset at each
        # evaluation's start when only evaluations update them (TF's fresh metric variables)
        self._evaluation_metrics = EvaluationMetrics(type(self).__name__)
        self._warned_continue = False
        # (global step, values) of every evaluation session's FinalOpsHooks (its state)
        self._evaluations: List[Tuple[int, Any]] = []
        # Built from what identifies the callback (as Lightning's callbacks build theirs from
        # their arguments): its name, else its stateful hooks' keys, else its hooks' classes.
        # A resume whose key changed finds its state in on_load_checkpoint.
        keys = hook_state_keys(self._all_hooks())  # two hooks of one key: refused here
        if name is not None:
            self._state_key = f"HookCallback[{name}]"
        else:
            described = keys or [type(h).__qualname__ for h in self._all_hooks()]
            self._state_key = "HookCallback{" + ",".join(described) + "}"

    # -- identity and state ----------------------------------------------------------------
    def _all_hooks(self) -> List[SessionRunHook]:
        return [*self.training_hooks, *self.evaluation_hooks, *self.prediction_hooks]

    @property
    def evaluation_history(self) -> List[Tuple[int, Any]]:
        """``[(global step, {name: value})]``: what each evaluation's ``FinalOpsHook`` s recorded.

        One entry per evaluation session (every validation, also inside ``fit``, and every
        ``Trainer.test``) and per distinct ``FinalOpsHook`` of ``evaluation_hooks`` (so of
        ``final_ops``) whose values are a dict, oldest first. What ``final_ops`` records at
        the end of a ``fit`` is no evaluation and is not in it. The values are the recorded
        objects (tensors on their device); the history is the callback's checkpointed state.
        The early-stopping hooks read it.
        """
        return self._evaluations

    def check_evaluation_history(self, argument: str) -> None:
        """Fail when the evaluations record nothing (no hook that records results).

        Args:
            argument: the argument this callback was given as, for the message.

        Raises:
            ValueError: no hook of ``evaluation_hooks`` records results (see
                :meth:`SessionRunHook.latest_results`: a ``FinalOpsHook`` over a dict does).
        """
        if not self._result_hooks():
            raise ValueError(
                f"{argument}: this HookCallback's evaluations record nothing to stop on: give "
                "it final_ops={'name': ...} or a FinalOpsHook({...}) in evaluation_hooks."
            )

    @property
    def state_key(self) -> str:
        """``"HookCallback[<name>]"``, else ``"HookCallback{<its stateful hooks' keys>}"``.

        Without stateful hooks: ``"HookCallback{<its hooks' classes>}"``. So two
        ``HookCallback`` s in one trainer have distinct keys unless they hold the same hooks
        (then give them names: Lightning refuses two callbacks with state under one key when
        the ``Trainer`` is built). When hooks were added or removed since the checkpoint, the
        key differs from the saved one and :meth:`on_load_checkpoint` finds the state. Built
        once, in ``__init__``: Lightning reads it at every hook call.
        """
        return self._state_key

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        """Find this callback's state when its key changed since the save (hooks edited).

        A saved ``HookCallback`` state that no callback of the trainer has the key of goes
        to the one unnamed callback, itself without saved state, that holds some of its
        hooks; Lightning restores every other callback's state under its own key.

        Raises:
            ValueError: such a state has no callback to go to (its hooks' state would be
                lost: a renamed callback, say), or could go to several (give the callbacks
                ``name=``).
        """
        key = _orphan_states_by_callback(trainer, checkpoint.get("callbacks") or {}).get(id(self))
        if key is not None:
            self.load_state_dict(checkpoint["callbacks"][key])

    def state_dict(self) -> Dict[str, Any]:
        """Every distinct stateful hook's ``state_dict()`` under its unique key.

        ``{}`` (so nothing in the checkpoint) when no hook has state.
        """
        states = hook_state_dict(self._all_hooks())
        state: Dict[str, Any] = {"hooks": states} if states else {}
        if self._evaluations:
            state["evaluation_history"] = list(self._evaluations)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Give every hook its saved state (Lightning calls this on ``ckpt_path=...``).

        Raises:
            ValueError: a saved non-empty state has no hook here (it would be lost): build
                the callback with the same hooks. A hook without saved state starts fresh.
        """
        if not isinstance(state_dict, Mapping) or not isinstance(
            state_dict.get("hooks", {}), Mapping
        ):
            raise TypeError(
                "HookCallback state must be a mapping {'hooks': {key: state}}, got "
                f"{type(state_dict).__name__}."
            )
        load_hook_state_dict(self._all_hooks(), state_dict.get("hooks", {}))
        self._evaluations = [(int(step), values)
                             for step, values in state_dict.get("evaluation_history", ())]

    # -- sessions --------------------------------------------------------------------------
    def _open(
        self, kind: str, trainer: Any, pl_module: Any, extra: Sequence[SessionRunHook] = ()
    ) -> Optional[HookedSession]:
        hooks = {
            TRAINING: self.training_hooks,
            EVALUATION: self.evaluation_hooks,
            PREDICTION: self.prediction_hooks,
        }[kind]
        if not hooks:
            return None
        _refuse_spawn_launcher(trainer, hooks)
        session = HookedSession(
            [*hooks, *extra], _LightningEngine(trainer, pl_module), f"{kind}_hooks",
            agree_across_ranks=kind == TRAINING, agreement_timeout=self.agreement_timeout,
            name=f"HookCallback's {kind} session",
            # A SIGTERM stops fit at one step on every rank (the saver's end() writes it),
            # in place of Lightning's handler, then raises Lightning's SIGTERMException
            stop_on_sigterm=None if kind == TRAINING else False,
            on_preempted=functools.partial(_raise_sigterm_exception, trainer),
            # DDP's backward is a collective: a hook's failure on one rank is raised at the
            # next batch end on every rank, so no rank waits inside that batch for it
            defer_failures=True,
        )
        self._sessions[kind] = session
        session.begin()
        return session

    def _close(self, kind: str) -> None:
        """End a session cleanly: every hook's ``end()`` in order."""
        session = self._sessions.pop(kind, None)
        if session is not None:
            session.abort_run()  # a run Lightning never finished (no batch end)
            latest = latest_results(self._result_hooks()) if kind == EVALUATION else None
            session.end()
            if latest is not None:
                self._record_evaluation(latest)

    def _result_hooks(self) -> List[SessionRunHook]:
        """The distinct evaluation hooks that record results, in list order."""
        distinct: Dict[int, SessionRunHook] = {}
        for hook in self.evaluation_hooks:
            if hook.records_results:
                distinct.setdefault(id(hook), hook)
        return list(distinct.values())

    def _record_evaluation(self, before: List[Any]) -> None:
        """Keep the entries the evaluation session that just ended recorded."""
        self._evaluations.extend(entry for _, entry in new_results(self._result_hooks(), before))

    def _finished_before_start(self, trainer: Any) -> bool:
        """Whether ``fit`` restored a job that had already reached its end, so ran nothing."""
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        return (max_steps is not None and max_steps >= 0
                and trainer.global_step >= max_steps) or (
            max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs
        )

    def _before_run(self, kind: str, batch: Any) -> None:
        """An evaluation or prediction batch starts (training has its own, shorter path)."""
        session = self._sessions.get(kind)
        if session is None:
            return
        if session.should_stop:
            # A hook stopped this evaluation/prediction after the previous batch. Lightning has
            # no API for that; its loops end the run cleanly on StopIteration raised before the
            # step (on_*_epoch_end and on_*_end still run, the previous batch fully counted).
            raise StopIteration
        # replace: a run that got no batch end (Lightning skipped it) is aborted
        pending = session.start_run(replace=True)
        if pending.str_feeds:
            _feed_batch(session, pending, batch)

    def _after_run(self, kind: str, outputs: Any) -> None:
        """An evaluation or prediction batch ends: finish its run (training has its own path).

        A stop requested in it ends the evaluation at the next batch start (``_before_run``).
        """
        session = self._sessions.get(kind)
        if session is not None:
            # missing_ok: a batch end whose start Lightning skipped (or that opened no run)
            session.finish_run(outputs, missing_ok=True)

    def _is_session(self, trainer: Any) -> bool:
        return self.include_sanity_check or not trainer.sanity_checking

    # -- training session ------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Training session: every training hook's ``begin()`` (``fit`` only).

        Raises:
            ValueError: another ``HookCallback`` of the trainer holds one of this one's hook
                objects (it would run twice per batch).
        """
        mine = {id(hook): hook for hook in self._all_hooks()}
        for other in trainer.callbacks:
            if other is not self and isinstance(other, HookCallback):
                shared = [type(h).__name__ for h in other._all_hooks() if id(h) in mine]
                if shared:
                    raise ValueError(
                        f"HookCallbacks {self.state_key} and {other.state_key} share hook "
                        f"objects {shared}, which would run twice per batch: give each hook "
                        "to one callback."
                    )
        if stage == "fit":
            self._open(TRAINING, trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Training session: ``after_create_session`` (model on device, state restored).

        A hook that stops the session at its creation (``coord.request_stop()``, as
        ``StopAtStepHook`` restored past its last step) stops ``fit`` before its first batch.
        """
        session = self._sessions.get(TRAINING)
        if session is not None:
            session.create()
            if session.coord.should_stop():
                trainer.should_stop = True

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Training session: every hook's ``before_run``; feeds applied."""
        session = self._sessions.get(TRAINING)
        if session is None:
            return
        if session.should_stop:
            # Lightning keeps training past a stop while min_epochs/min_steps are not met.
            if not self._warned_continue:
                self._warned_continue = True
                warnings.warn(
                    "A hook requested a stop, but Lightning keeps training to honour "
                    "min_epochs/min_steps; the hooks keep running for those batches.",
                    stacklevel=2,
                )
            session.should_stop = False
        # replace: a run that got no batch end (Lightning skipped it) is aborted
        pending = session.start_run(replace=True)
        if pending.str_feeds:
            _feed_batch(session, pending, batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Training session: fetches evaluated, ``after_run``; a stop stops ``fit``."""
        session = self._sessions.get(TRAINING)
        # missing_ok: a batch end whose start Lightning skipped (or that opened no run)
        if session is not None and session.finish_run(outputs, missing_ok=True):
            trainer.should_stop = True
            if session.preempted:
                # A SIGTERM's agreed stop: the session ends here, so the saver's final
                # checkpoint is this batch end's (resumable mid-epoch, as Lightning's own
                # batch-end checkpoints); then Lightning's SIGTERMException, as its loops do.
                self._close(TRAINING)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Closes a run whose batch end Lightning skipped (``on_train_batch_start`` -> -1)."""
        session = self._sessions.get(TRAINING)
        if session is not None:
            session.abort_run()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Training session: every hook's ``end()``, the model still on its device."""
        self._close(TRAINING)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Ends the training session if Lightning skipped ``on_train_end``."""
        # on_train_end is skipped when a stop is set before training starts: end it here.
        session = self._sessions.get(TRAINING)
        if session is not None and not session.created and self._finished_before_start(trainer):
            # fit(ckpt_path=...) of a finished job: Lightning trained nothing, and neither
            # does the training session (re-running a finished job is a no-op)
            self._sessions.pop(TRAINING).abandon()
            logger.info("Training had already finished at global step %d: no training "
                        "session ran; the hooks keep their restored state.", trainer.global_step)
            return
        self._close(TRAINING)

    # -- evaluation sessions ---------------------------------------------------------------
    def _eval_start(self, trainer: Any, pl_module: Any, prefix: str) -> None:
        if self.evaluation_hooks:  # the sanity check too: its updates count as an evaluation's
            read = metrics_reached(*hooks_final_ops(self.evaluation_hooks))
            self._evaluation_metrics.start(read, metrics_reached(pl_module), read)
        if not self._is_session(trainer):
            return
        extra: List[SessionRunHook] = []
        result_hooks = self._result_hooks()
        if self.log_final_ops and result_hooks and trainer.loggers:
            extra.append(ResultsExportHook(result_hooks, prefix))
        session = self._open(EVALUATION, trainer, pl_module, extra)
        if session is not None:
            session.create()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Evaluation session: ``begin()`` and ``after_create_session``."""
        self._eval_start(trainer, pl_module, "final_ops/val")

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Evaluation session: every hook's ``before_run``."""
        self._before_run(EVALUATION, batch)

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Evaluation session: ``after_run``; a stop ends this validation."""
        self._after_run(EVALUATION, outputs)  # a stop ends the run at the next batch start

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Evaluation session: every hook's ``end()``, then the values to the loggers.

        A checkpoint the training session asked for at the batch this validation follows
        is written now, with what the validation recorded (Lightning's own restart point
        here resumes exactly); a stop its listeners ask for stops ``fit``.
        """
        self._close(EVALUATION)
        self._evaluation_metrics.end()
        training = self._sessions.get(TRAINING)
        if training is not None and training.created and training.flush_checkpoint():
            trainer.should_stop = True

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Evaluation session: ``begin()`` and ``after_create_session``."""
        self._eval_start(trainer, pl_module, "final_ops/test")

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Evaluation session: every hook's ``before_run``."""
        self._before_run(EVALUATION, batch)

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Evaluation session: ``after_run``; a stop ends this test run."""
        self._after_run(EVALUATION, outputs)  # a stop ends the run at the next batch start

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Evaluation session: every hook's ``end()``, then the values to the loggers."""
        self._close(EVALUATION)
        self._evaluation_metrics.end()

    # -- prediction session ----------------------------------------------------------------
    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Prediction session: ``begin()`` and ``after_create_session``."""
        session = self._open(PREDICTION, trainer, pl_module)
        if session is not None:
            session.create()

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Prediction session: every hook's ``before_run``."""
        self._before_run(PREDICTION, batch)

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Prediction session: ``after_run``; a stop ends this prediction run."""
        self._after_run(PREDICTION, outputs)  # a stop ends the run at the next batch start

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Prediction session: every hook's ``end()``."""
        self._close(PREDICTION)

    # -- failure ---------------------------------------------------------------------------
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Ends every open session without ``end()`` (TF's rule); restores fed tensors."""
        # TF's rule: after an exception no hook's end() runs. Undo the feeds of the run in
        # flight and forget the sessions; never raise here (it would skip Lightning's cleanup).
        for session in self._sessions.values():
            try:
                session.abandon(exception)
            except Exception as e:  # pragma: no cover - defensive
                warnings.warn(f"HookCallback could not end the step: {e!r}", stacklevel=2)
        self._sessions.clear()


def _orphan_states_by_callback(trainer: Any, states: Mapping[str, Any]) -> Dict[int, str]:
    """``{id(callback): saved key}`` for the HookCallback states no callback has the key of.

    Raises:
        ValueError: a state goes to no callback, or to several.
    """
    claimed = {callback.state_key for callback in trainer.callbacks}
    orphans = {
        key: set(state.get("hooks", {})) for key, state in states.items()
        if isinstance(key, str) and key.startswith("HookCallback") and key not in claimed
        and isinstance(state, Mapping) and state.get("hooks")
    }
    if not orphans:
        return {}
    seekers = [
        callback for callback in trainer.callbacks
        if isinstance(callback, HookCallback) and callback.name is None
        and callback.state_key not in states
    ]
    found: Dict[int, str] = {}
    taken: Dict[str, str] = {}
    for callback in seekers:
        mine = set(hook_state_keys(callback._all_hooks()))
        candidates = [key for key, hooks in orphans.items() if mine & hooks]
        if len(candidates) > 1:
            raise ValueError(
                f"The checkpoint holds the state of several HookCallbacks {candidates} that "
                f"no callback here has the key of, and {callback.state_key} holds hooks of "
                "each: which is its own cannot be told. Give each HookCallback a name= (its "
                "key then does not depend on its hooks)."
            )
        if candidates:
            if candidates[0] in taken:
                raise ValueError(
                    f"The saved state {candidates[0]} could go to {taken[candidates[0]]} or "
                    f"to {callback.state_key}: give each HookCallback a name=."
                )
            taken[candidates[0]] = callback.state_key
            found[id(callback)] = candidates[0]
    lost = sorted(set(orphans) - set(taken))
    if lost:
        raise ValueError(
            f"The checkpoint holds hook state under {lost}, and no HookCallback here can take "
            "it (none has that key, nor holds those hooks): it would be lost. Build the "
            "callbacks as when the checkpoint was saved (the same name=, the same stateful "
            "hooks)."
        )
    return found


def _refuse_spawn_launcher(trainer: Any, hooks: Sequence[SessionRunHook]) -> None:
    """Refuse spawn-style launchers when hooks hold results the launching process would lose."""
    # Lightning has no public way to ask whether the launching process is a rank: its
    # launchers are exported under private names only, so the class is matched by name.
    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher).__name__ != "_MultiProcessingLauncher":
        return
    holders = sorted({type(h).__name__ for h in hooks if has_state(h)})
    if holders:
        raise RuntimeError(
            f"HookCallback: {holders} keep values or state in the worker processes of "
            f"strategy={type(trainer.strategy).__name__} with start method "
            f"'{getattr(launcher, '_start_method', 'spawn')}', and the launching process never "
            "sees them (Lightning sends back only the model and callback_metrics). Use "
            "strategy='ddp' (the launching process is rank 0 and keeps its hooks' values), or "
            "log the values "
            "(HookCallback(log_final_ops=True) writes each evaluation's values to the loggers)."
        )
