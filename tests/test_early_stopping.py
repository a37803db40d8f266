"""The early-stopping hooks: TF's ``early_stopping_test.py`` ported, plus both adapters."""

from __future__ import annotations

import os

import pytest
import torch
from lightning_models import make_module_class, make_trainer
from torch.utils.tensorboard import SummaryWriter

from lightning_finalops import (
    FinalOpsHook,
    HookCallback,
    MonitoredSession,
    MonitoredTrainingSession,
    SessionRunHook,
    make_early_stopping_hook,
    read_eval_metrics,
    stop_if_higher_hook,
    stop_if_lower_hook,
    stop_if_no_decrease_hook,
    stop_if_no_increase_hook,
)

# TF's fixture (early_stopping_test.py L140-165): (global step, loss, accuracy)
EVALS = [(1000, 0.8, 0.5), (2000, 0.7, 0.6), (3000, 0.4, 0.7), (3500, 0.41, 0.68)]


def write_events(eval_dir, evals, flush_each=False) -> None:
    writer = SummaryWriter(str(eval_dir))
    for step, loss, acc in evals:
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("accuracy", acc, step)
        if flush_each:
            writer.flush()
    writer.close()


def final_ops_with_history(evals) -> FinalOpsHook:
    hook = FinalOpsHook({"loss": torch.zeros(()), "accuracy": torch.zeros(())})
    hook.load_state_dict({"final_ops_history": [
        (step, {"loss": torch.tensor(loss), "accuracy": torch.tensor(acc)})
        for step, loss, acc in evals
    ]})
    return hook


@pytest.fixture(params=["eval_dir", "FinalOpsHook"])
def source(request, tmp_path):
    """``make(factory, *args, **kwargs)`` builds a hook reading TF's fixture evaluations."""
    if request.param == "eval_dir":
        write_events(tmp_path, EVALS)
        return lambda factory, *a, **k: factory(None, *a, eval_dir=str(tmp_path), **k)
    hook = final_ops_with_history(EVALS)
    return lambda factory, *a, **k: factory(hook, *a, **k)


def stops_after_one_run(*hooks: SessionRunHook) -> bool:
    """TF's check: one run at step 0, then ``should_stop()``."""
    with MonitoredSession(list(hooks)) as sess:
        sess.run(lambda: None)
        return sess.should_stop()


# -- read_eval_metrics ---------------------------------------------------------------------
def test_read_eval_metrics(tmp_path) -> None:
    write_events(tmp_path, EVALS[:3])
    metrics = read_eval_metrics(str(tmp_path))
    assert list(metrics) == [1000, 2000, 3000]
    for step, loss, acc in EVALS[:3]:
        assert metrics[step] == pytest.approx({"loss": loss, "accuracy": acc})


def test_read_eval_metrics_merges_files_and_orders_by_step(tmp_path) -> None:
    write_events(tmp_path, [EVALS[2]])
    write_events(tmp_path, [EVALS[0]])  # a second file, earlier steps
    assert list(read_eval_metrics(tmp_path)) == [1000, 3000]


def test_data_loss_error_skips_the_rest_of_the_file_with_a_warning(tmp_path) -> None:
    write_events(tmp_path, EVALS[:2], flush_each=True)
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents")]
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record (step 2000's accuracy): its crc check fails
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="Skipping rest of the file due to encountering "
                      "data corruption error; file path: .*events.out.tfevents"):
        metrics = read_eval_metrics(str(tmp_path))
    assert list(metrics) == [1000, 2000]
    assert metrics[1000] == pytest.approx({"loss": 0.8, "accuracy": 0.5})
    assert "accuracy" not in metrics[2000]  # the corrupt record and everything after it


def test_read_eval_metrics_when_no_events(tmp_path) -> None:
    assert read_eval_metrics(str(tmp_path)) == {}
    assert read_eval_metrics(str(tmp_path / "missing")) == {}


# -- the predicates on TF's fixture (L167-L215) ---------------------------------------------
@pytest.mark.parametrize("threshold, min_steps, stops", [(0.8, 0, False), (0.6, 4000, False),
                                                         (0.6, 0, True)])
def test_stop_if_higher_hook(source, threshold, min_steps, stops) -> None:
    hook = source(stop_if_higher_hook, "accuracy", threshold, min_steps=min_steps)
    assert stops_after_one_run(hook) is stops


@pytest.mark.parametrize("threshold, min_steps, stops", [(0.3, 0, False), (0.5, 4000, False),
                                                         (0.5, 0, True)])
def test_stop_if_lower_hook(source, threshold, min_steps, stops) -> None:
    hook = source(stop_if_lower_hook, "loss", threshold, min_steps=min_steps)
    assert stops_after_one_run(hook) is stops


@pytest.mark.parametrize("max_steps, min_steps, stops", [(1500, 0, False), (500, 4000, False),
                                                         (500, 0, True)])
def test_stop_if_no_increase_hook(source, max_steps, min_steps, stops) -> None:
    hook = source(stop_if_no_increase_hook, "accuracy", max_steps, min_steps=min_steps)
    assert stops_after_one_run(hook) is stops


@pytest.mark.parametrize("max_steps, min_steps, stops", [(1500, 0, False), (500, 4000, False),
                                                         (500, 0, True)])
def test_stop_if_no_decrease_hook(source, max_steps, min_steps, stops) -> None:
    hook = source(stop_if_no_decrease_hook, "loss", max_steps, min_steps=min_steps)
    assert stops_after_one_run(hook) is stops


@pytest.mark.parametrize("max_steps, threshold, stops", [(1500, 0.3, False), (1500, 0.5, True),
                                                         (500, 0.3, True)])
def test_multiple_hooks(source, max_steps, threshold, stops) -> None:
    hooks = [source(stop_if_no_decrease_hook, "loss", max_steps),
             source(stop_if_lower_hook, "loss", threshold)]
    assert stops_after_one_run(*hooks) is stops


def test_thresholds_are_strict_and_ties_are_no_improvement() -> None:
    flat = final_ops_with_history([(0, 0.5, 0.5), (10, 0.5, 0.5)])
    assert not stops_after_one_run(stop_if_lower_hook(flat, "loss", 0.5))
    assert not stops_after_one_run(stop_if_higher_hook(flat, "accuracy", 0.5))
    # best stays at step 0 (a tie does not improve): 10 - 0 >= 10
    assert stops_after_one_run(stop_if_no_decrease_hook(flat, "loss", 10))
    assert not stops_after_one_run(stop_if_no_decrease_hook(flat, "loss", 11))


def test_no_evaluation_yet_never_stops() -> None:
    empty = FinalOpsHook({"loss": torch.zeros(())})
    for factory, arg in [(stop_if_lower_hook, 1e9), (stop_if_no_decrease_hook, 0)]:
        assert not stops_after_one_run(factory(empty, "loss", arg))


def test_unknown_metric_name_lists_the_names() -> None:
    hook = stop_if_lower_hook(final_ops_with_history(EVALS), "acc", 0.5)
    with pytest.raises(KeyError, match="'acc' is in no evaluation.*accuracy"):
        stops_after_one_run(hook)


@pytest.mark.parametrize("should_stop", [True, False])
def test_make_early_stopping_hook(should_stop) -> None:
    assert stops_after_one_run(make_early_stopping_hook(lambda: should_stop)) is should_stop


def test_errors() -> None:
    with pytest.raises(TypeError, match="`eval_results` must be a FinalOpsHook"):
        stop_if_higher_hook(object(), "acc", 0.5)
    with pytest.raises(ValueError, match="Only one of `run_every_secs` and `run_every_steps`"):
        make_early_stopping_hook(lambda: True, run_every_secs=60, run_every_steps=100)
    with pytest.raises(ValueError, match="Either every_secs or every_steps should be provided"):
        make_early_stopping_hook(lambda: True, run_every_secs=None)
    with pytest.raises(TypeError, match="`should_stop_fn` must be callable."):
        make_early_stopping_hook(True)
    with pytest.raises(ValueError, match="eval_dir must name a directory"):
        stop_if_lower_hook(None, "loss", 0.5)
    hook = FinalOpsHook({"loss": torch.zeros(())})
    with pytest.raises(ValueError, match="not both"):
        stop_if_lower_hook(hook, "loss", 0.5, eval_dir="x")
    with pytest.raises(TypeError, match="metric_name"):
        stop_if_lower_hook(hook, 3, 0.5)
    with pytest.raises(TypeError, match="threshold"):
        stop_if_lower_hook(hook, "loss", "0.5")
    with pytest.raises(ValueError, match="max_steps_without_decrease"):
        stop_if_no_decrease_hook(hook, "loss", -1)


# -- the hook: schedule and state (TF's StopOnPredicateHookTest / CheckForStoppingHookTest) ---
@pytest.mark.parametrize("should_stop", [False, True])
def test_stop_is_the_hooks_state(should_stop) -> None:
    hook = make_early_stopping_hook(lambda: should_stop, run_every_secs=0)
    assert stops_after_one_run(hook) is should_stop
    assert hook.state_dict() == {"stop": should_stop}


def test_a_restored_stop_stops_the_session_at_its_creation() -> None:
    with MonitoredSession([make_early_stopping_hook(lambda: True)]) as sess:
        sess.run(lambda: None)
        state = sess.state_dict()
    calls = []
    hook = make_early_stopping_hook(lambda: calls.append(1) or False)
    with MonitoredSession([hook], state=state) as sess:
        assert sess.should_stop()
    assert calls == [] and hook.stopped


def test_a_stopped_hook_reused_without_a_checkpoint_starts_unstopped() -> None:
    answers = iter([True, False, False])
    hook = make_early_stopping_hook(lambda: next(answers), run_every_secs=0)
    assert stops_after_one_run(hook)
    assert not stops_after_one_run(hook)  # a new session: TF's STOP started False
    assert not hook.stopped


def test_run_every_steps_checks_on_the_first_run_then_every_n_steps() -> None:
    checked_at = []
    sessions = []

    def should_stop() -> bool:
        checked_at.append(sessions[0].global_step)
        return False

    with MonitoredSession([make_early_stopping_hook(should_stop, None, 3)]) as sess:
        sessions.append(sess)
        for _ in range(8):
            sess.run(lambda: None)
    assert checked_at == [1, 4, 7]


def test_run_every_secs_uses_the_session_clock(monkeypatch) -> None:
    from lightning_finalops.hooks import timers

    now = [0.0]
    monkeypatch.setattr(timers, "clock", lambda: now[0])
    checks = []
    hook = make_early_stopping_hook(lambda: checks.append(now[0]) or now[0] >= 120,
                                    run_every_secs=60)
    with MonitoredSession([hook]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
            now[0] += 25
        assert sess.global_step == 7
    assert checks == [0.0, 75.0, 150.0]  # the first run, then 60 s or more since the last


def test_the_history_grows_during_training() -> None:
    """A FinalOpsHook evaluated between runs (here by hand) feeds the hook live."""
    values = iter([0.9, 0.5, 0.6, 0.7, 0.8, 0.9])
    loss = torch.zeros(())
    evaluated = FinalOpsHook({"loss": loss})
    hook = stop_if_no_decrease_hook(evaluated, "loss", 3, run_every_secs=None,
                                    run_every_steps=1)

    class Evaluate(SessionRunHook):
        def after_run(self, run_context, run_values):
            loss.fill_(next(values))
            evaluated.end(run_context.session)

    with MonitoredSession([Evaluate(), hook]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
        assert sess.global_step == 5  # best 0.5 at step 2; 5 - 2 >= 3
    assert hook.stopped


# -- resume after an early stop --------------------------------------------------------------
def test_resume_after_an_early_stop_stays_stopped(tmp_path) -> None:
    def hooks():
        return [make_early_stopping_hook(lambda: sess.global_step >= 4, None, 1)]

    model = torch.nn.Linear(1, 1)
    with MonitoredTrainingSession(checkpoint_dir=str(tmp_path), hooks=hooks(),
                                  modules=model, save_checkpoint_steps=1) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
        assert sess.global_step == 4
    with MonitoredTrainingSession(checkpoint_dir=str(tmp_path), hooks=hooks(),
                                  modules=model, save_checkpoint_steps=1) as sess:
        assert sess.global_step == 4
        assert sess.should_stop()  # restored stopped: nothing runs


# -- Lightning -------------------------------------------------------------------------------
TinyModule = make_module_class("pytorch_lightning")


class DecreasingThenFlat(TinyModule):
    """Logs a validation loss that improves twice, then stays flat."""

    def __init__(self) -> None:
        super().__init__(n_train=8, n_val=2)
        self.validations = 0

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("scripted_loss", float([0.9, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3][
            min(self.validations, 7)]))

    def on_validation_epoch_end(self) -> None:
        self.validations += 1


@pytest.mark.parametrize("kind", ["FinalOpsHook", "HookCallback"])
def test_no_decrease_in_trainer_fit_stops_after_the_patience(kind) -> None:
    final_ops = FinalOpsHook({"scripted_loss": "scripted_loss"})
    if kind == "FinalOpsHook":
        stopper = stop_if_no_decrease_hook(final_ops, "scripted_loss", 4, run_every_secs=None,
                                           run_every_steps=1)
        callbacks = [HookCallback(training_hooks=[stopper], evaluation_hooks=[final_ops])]
    else:
        evaluations = HookCallback(final_ops={"scripted_loss": "scripted_loss"},
                                   log_final_ops=False)
        stopper = stop_if_no_decrease_hook(evaluations, "scripted_loss", 4,
                                           run_every_secs=None, run_every_steps=1)
        callbacks = [evaluations, HookCallback(training_hooks=[stopper], name="stopper")]
    # 4 batches per epoch, a validation every 2 batches: validations at steps 2, 4, 6, ...
    trainer = make_trainer(max_epochs=20, val_check_interval=2, callbacks=callbacks)
    trainer.fit(DecreasingThenFlat())
    # best 0.3 at step 6 (third validation); 10 - 6 >= 4 is seen at the run after step 10
    assert trainer.global_step == 11
    assert stopper.stopped


@pytest.mark.parametrize("factory, metric, arg", [
    (stop_if_lower_hook, "scripted_loss", 0.4), (stop_if_higher_hook, "neg_loss", -0.4),
    (stop_if_no_increase_hook, "neg_loss", 4),
])
def test_each_hook_in_trainer_fit(factory, metric, arg) -> None:
    class Negated(DecreasingThenFlat):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("neg_loss", -float([0.9, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3][
                min(self.validations, 7)]))

    final_ops = FinalOpsHook({"scripted_loss": "scripted_loss", "neg_loss": "neg_loss"})
    stopper = factory(final_ops, metric, arg, run_every_secs=None, run_every_steps=1)
    trainer = make_trainer(max_epochs=20, val_check_interval=2, callbacks=[
        HookCallback(training_hooks=[stopper], evaluation_hooks=[final_ops])])
    trainer.fit(Negated())
    # thresholds: crossed at the validation of step 6 (0.3), seen at the next run (step 7)
    assert trainer.global_step == (7 if factory is not stop_if_no_increase_hook else 11)


def test_lightning_resume_after_an_early_stop_is_a_finished_job(tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(ckpt_path=None):
        final_ops = FinalOpsHook({"scripted_loss": "scripted_loss"})
        stopper = stop_if_lower_hook(final_ops, "scripted_loss", 0.4, run_every_secs=None,
                                     run_every_steps=1)
        checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True,
                                     every_n_train_steps=1, save_top_k=-1)
        trainer = make_trainer(max_epochs=20, val_check_interval=2, callbacks=[
            HookCallback(training_hooks=[stopper], evaluation_hooks=[final_ops]), checkpoint,
        ], enable_checkpointing=True)
        model = DecreasingThenFlat()
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, stopper, model

    trainer, stopper, _ = fit()
    assert trainer.global_step == 7 and stopper.stopped
    trainer, stopper, model = fit(os.path.join(str(tmp_path), "last.ckpt"))
    assert trainer.global_step == 7 and stopper.stopped
    assert model.validations == 0  # nothing trained or evaluated again


def test_make_early_stopping_hook_in_trainer_fit() -> None:
    trainer = None
    stopper = make_early_stopping_hook(lambda: trainer.global_step >= 5, run_every_secs=0)
    trainer = make_trainer(max_epochs=20, callbacks=[HookCallback(training_hooks=[stopper])])
    trainer.fit(DecreasingThenFlat())
    assert trainer.global_step == 5 and stopper.stopped


def test_hookcallback_history_leaves_out_the_end_of_fit_entry_also_after_resume(tmp_path):
    """The entry ``final_ops`` records at the end of a fit is no evaluation: counted as one,
    it would end the patience early on resume (best 0.3 at step 12, fit ended at 14)."""
    from lightning_finalops import CheckpointSaverHook

    def fit(max_steps, ckpt_path=None):
        evaluations = HookCallback(final_ops={"scripted_loss": "scripted_loss"},
                                   log_final_ops=False, name="evals")
        stopper = stop_if_no_decrease_hook(evaluations, "scripted_loss", 2,
                                           run_every_secs=None, run_every_steps=1)
        saver = CheckpointSaverHook(str(tmp_path), save_steps=1)
        trainer = make_trainer(max_steps=max_steps, max_epochs=-1, val_check_interval=4,
                               callbacks=[evaluations, HookCallback(
                                   training_hooks=[stopper, saver], name="stopper")])
        model = DecreasingThenFlat()
        model.validations = 0 if ckpt_path is None else 3
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, evaluations

    trainer, evaluations = fit(14)
    assert [s for s, _ in evaluations.final_ops_hook.final_ops_history] == [4, 8, 12, 14]
    assert [s for s, _ in evaluations.evaluation_history] == [4, 8, 12]
    trainer, evaluations = fit(40, os.path.join(str(tmp_path), "model.ckpt-14"))
    # as without the interruption: validation at 16 (16 - 12 >= 2), the stop one run later
    assert trainer.global_step == 17
    # Lightning validates once more when the stop ends the epoch (step 17); both ends of
    # fit (14 and 17) are left out
    assert [s for s, _ in evaluations.final_ops_hook.final_ops_history] == [
        4, 8, 12, 14, 16, 17, 17]
    assert [s for s, _ in evaluations.evaluation_history] == [4, 8, 12, 16, 17]


def test_values_that_are_numpy_scalars_count() -> None:
    import numpy as np

    hook = FinalOpsHook({"acc": torch.zeros(())})
    hook.load_state_dict({"final_ops_history": [(10, {"acc": np.float32(0.9)})]})
    assert stops_after_one_run(stop_if_higher_hook(hook, "acc", 0.5))


def test_a_metric_that_is_not_one_number_is_a_clear_error() -> None:
    hook = FinalOpsHook({"acc": torch.zeros(2)})
    hook.load_state_dict({"final_ops_history": [(10, {"acc": torch.zeros(2)})]})
    with pytest.raises(TypeError, match="'acc' at step 10 is not one number"):
        stops_after_one_run(stop_if_higher_hook(hook, "acc", 0.5))


def test_sources_that_can_never_stop_are_refused_when_built() -> None:
    with pytest.raises(TypeError, match="final_ops must be a dict"):
        stop_if_lower_hook(FinalOpsHook(torch.zeros(())), "loss", 0.5)
    with pytest.raises(ValueError, match="evaluations record nothing"):
        stop_if_lower_hook(HookCallback(), "loss", 0.5)
    with pytest.raises(ValueError, match="run_every_secs must be a finite number of seconds >= 0"):
        make_early_stopping_hook(lambda: True, run_every_secs=-1)
    with pytest.raises(ValueError, match="metric_name"):
        stop_if_lower_hook(FinalOpsHook({"loss": "loss"}), "", 0.5)


def test_hookcallback_history_keeps_a_validate_after_fit_at_the_same_step() -> None:
    evaluations = HookCallback(final_ops={"scripted_loss": "scripted_loss"},
                               log_final_ops=False)
    trainer = make_trainer(max_steps=4, max_epochs=-1, val_check_interval=4,
                           callbacks=[evaluations])
    model = DecreasingThenFlat()
    trainer.fit(model)
    trainer.validate(model)  # at the same global step as the end of fit
    history = evaluations.evaluation_history
    assert [s for s, _ in history] == [4, 4]
    assert [float(v["scripted_loss"]) for _, v in history] == pytest.approx([0.9, 0.5])
