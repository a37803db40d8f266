"""Session rules that live once, in the core, and hold in every adapter."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from lightning_models import ResumableBatches, make_module_class, make_trainer
from torch import nn

from lightning_finalops import (
    CheckpointSaverHook,
    CheckpointSaverListener,
    FinalOpsHook,
    HookCallback,
    InMemoryEvaluatorHook,
    MonitoredSession,
    SessionRunHook,
    StopAtStepHook,
)


class Spy(SessionRunHook):
    """Records which hook methods ran."""

    def __init__(self):
        self.calls = []

    def after_create_session(self, session, coord):
        self.calls.append("after_create_session")

    def end(self, session):
        self.calls.append("end")


def _plain_job(tmp_path, last_step, spy, evaluated):
    model = nn.Linear(1, 1)
    evaluator = InMemoryEvaluatorHook(lambda b: evaluated.append(b), lambda: [0, 1, 2],
                                      every_n_iter=100)
    saver = CheckpointSaverHook(str(tmp_path), save_steps=100)
    hooks = [spy, evaluator, StopAtStepHook(last_step=last_step), saver]
    with MonitoredSession(hooks, modules=model, checkpoint_dir=str(tmp_path)) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    return evaluator


def test_a_finished_plain_job_run_again_creates_no_session(tmp_path, caplog):
    evaluated = []
    first = _plain_job(tmp_path, 3, Spy(), evaluated)
    assert len(first.evaluation_history) == 2 and len(evaluated) == 6
    files = sorted(os.listdir(tmp_path))
    mtimes = [os.stat(tmp_path / f).st_mtime_ns for f in files]

    spy, evaluated = Spy(), []
    with caplog.at_level(logging.INFO, logger="lightning_finalops"):
        again = _plain_job(tmp_path, 3, spy, evaluated)
    assert spy.calls == [] and evaluated == []  # no after_create_session, evaluation or end
    assert len(again.evaluation_history) == 2  # the restored history, nothing recorded
    assert sorted(os.listdir(tmp_path)) == files
    assert [os.stat(tmp_path / f).st_mtime_ns for f in files] == mtimes  # nothing written
    finished = [r for r in caplog.records if "job is finished" in r.getMessage()]
    assert len(finished) == 1 and "StopAtStepHook" in finished[0].getMessage()


def test_a_finished_lightning_job_run_again_creates_no_training_session(tmp_path):
    spy = Spy()
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([spy, StopAtStepHook(last_step=2)])])
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "done.ckpt")
    trainer.save_checkpoint(ckpt)
    again = Spy()
    trainer = make_trainer(max_epochs=5, limit_val_batches=0,
                           callbacks=[HookCallback([again, StopAtStepHook(last_step=2)])])
    trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)
    assert spy.calls == ["after_create_session", "end"]
    assert again.calls == [] and trainer.global_step == 2


class Shipper(CheckpointSaverListener):
    """Uploads each checkpoint it hears of (reads its hook state), in after_save and end."""

    def __init__(self, directory):
        self.directory, self.shipped = str(directory), []

    def _ship(self, step):
        path = os.path.join(self.directory, f"model.ckpt-{step}")
        self.shipped.append((path, _hook_state(path)))

    def after_save(self, session, global_step_value):
        self._ship(global_step_value)

    def end(self, session, global_step_value):
        self._ship(global_step_value)


def _hook_state(path):
    checkpoint = torch.load(path, weights_only=False)
    if "session" in checkpoint:
        return checkpoint["session"]["hooks"]
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("HookCallback"))


@pytest.mark.parametrize("stop", [True, False], ids=["stopped", "data ran out"])
def test_listeners_hear_of_the_file_that_ends_on_disk_in_a_plain_loop(tmp_path, stop):
    """What a listener ships in after_save or end is the final file, end() values included."""
    shipper = Shipper(tmp_path)
    final = FinalOpsHook({"w": lambda: torch.ones(())}, name="w")
    hooks = [CheckpointSaverHook(str(tmp_path), save_steps=2, listeners=[shipper]), final]
    with MonitoredSession(hooks + ([StopAtStepHook(last_step=2)] if stop else []),
                          modules=nn.Linear(1, 1)) as sess:
        for _ in range(2):
            sess.run(lambda: None)
    last = shipper.shipped[-1]
    assert last[0].endswith("model.ckpt-2") and last[1] == _hook_state(last[0])
    assert last[1]["FinalOpsHook[w]"]["final_ops_history"][-1][0] == 2  # end()'s entry


def test_a_lightning_checkpoint_waits_for_the_validation_after_its_batch(tmp_path):
    """The saver asks at an epoch's last batch; the file holds that epoch's validation."""
    shipper = Shipper(tmp_path)
    callback = HookCallback([CheckpointSaverHook(str(tmp_path), save_steps=4,
                                                 listeners=[shipper])],
                            final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(make_module_class()())  # 4 batches an epoch, a validation after each epoch
    assert trainer.global_step == 8
    mid = os.path.join(str(tmp_path), "model.ckpt-4")
    saved = _hook_state(mid)
    assert [step for step, _ in saved["evaluation_history"]] == [4]
    last_heard = dict(shipper.shipped)  # per file, what the listener heard of last
    assert all(state == _hook_state(path) for path, state in last_heard.items())
    assert [p for p, _ in shipper.shipped].count(mid) == 1  # written once, after validation


@pytest.mark.parametrize("name", ["val_loss"])
def test_the_end_of_a_session_never_crashes_on_a_name_no_run_produced(name, caplog):
    hook = FinalOpsHook({"loss": name, "one": lambda: torch.ones(())})
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        with MonitoredSession([hook, StopAtStepHook(last_step=1)]) as sess:
            sess.run(lambda: {"loss": torch.zeros(())})
    step, values = hook.final_ops_history[-1]
    assert step == 1 and values["loss"] is None and float(values["one"]) == 1.0
    assert any(name in r.getMessage() for r in caplog.records)


def test_a_missing_name_never_makes_another_final_op_run_twice(caplog):
    calls = []
    hook = FinalOpsHook({"a": lambda: calls.append(1) or torch.ones(()), "loss": "val_loss"})
    with MonitoredSession([hook, StopAtStepHook(last_step=1)]) as sess:
        sess.run(lambda: None)
    assert calls == [1] and hook.final_ops_values["loss"] is None


def test_a_named_hook_callback_refuses_two_hooks_of_one_state_key_when_built():
    with pytest.raises(ValueError, match="Two stateful hooks have the state key"):
        HookCallback(training_hooks=[FinalOpsHook({"x": "loss"})],
                     evaluation_hooks=[FinalOpsHook({"x": "loss"})], name="main")


def _train_and_save(tmp_path):
    from lightning_finalops import MonitoredTrainingSession

    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    final = FinalOpsHook({"w": lambda: model.weight.norm()}, name="w")

    def step():
        optimizer.zero_grad()
        loss = model(torch.ones(4, 2)).pow(2).mean()
        loss.backward()
        optimizer.step()

    with MonitoredTrainingSession(checkpoint_dir=str(tmp_path), modules=model,
                                  optimizers=optimizer, hooks=[final, StopAtStepHook(3)],
                                  save_checkpoint_steps=1) as sess:
        while not sess.should_stop():
            sess.run(step)
    return model


def test_a_session_given_only_the_model_restores_weights_and_step_from_training(tmp_path,
                                                                                caplog):
    trained = _train_and_save(tmp_path)
    model = nn.Linear(2, 1)
    with caplog.at_level(logging.INFO, logger="lightning_finalops"):
        with MonitoredSession(modules=model, checkpoint_dir=str(tmp_path)) as sess:
            assert sess.global_step == 3
    assert torch.equal(model.weight, trained.weight) and torch.equal(model.bias, trained.bias)
    (line,) = [r.getMessage() for r in caplog.records if "Restoring parameters" in r.getMessage()]
    assert "optimizers['optimizer']" in line and "hook state 'FinalOpsHook[w]'" in line


def test_strict_restores_refuse_what_has_no_place_and_say_how_to_skip_it(tmp_path):
    _train_and_save(tmp_path)
    with pytest.raises(ValueError, match=r"strict=False"):
        MonitoredSession(modules=nn.Linear(2, 1), checkpoint_dir=str(tmp_path), strict=True)
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"pass strict=False"):  # the hook state
        MonitoredSession(modules=nn.Linear(2, 1), optimizers=optimizer,
                         checkpoint_dir=str(tmp_path))
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with MonitoredSession(modules=model, optimizers=optimizer, checkpoint_dir=str(tmp_path),
                          strict=False) as sess:
        assert sess.global_step == 3 and optimizer.state_dict()["state"]  # momentum restored
    with pytest.raises(TypeError, match="strict"):
        MonitoredSession(strict="yes")


@pytest.mark.parametrize("build, match", [
    (lambda: MonitoredSession(checkpoint_basename=""), "checkpoint_basename"),
    (lambda: MonitoredSession(checkpoint_basename="a/b"), "checkpoint_basename"),
    (lambda: MonitoredSession(checkpoint_basename=42), "checkpoint_basename"),
    (lambda: CheckpointSaverHook("ckpt", save_steps=1, save_graph_def="yes"), "save_graph_def"),
])
def test_constructor_misuse_found_by_fuzzing_names_the_argument(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_run_options_take_an_int_trace_level_only():
    from lightning_finalops import RunOptions

    with pytest.raises(ValueError, match="trace_level"):
        RunOptions(trace_level=1.0)


def test_monitored_training_session_names_a_fabric_that_is_not_one():
    from lightning_finalops import MonitoredTrainingSession

    with pytest.raises(TypeError, match="fabric must be a launched"):
        MonitoredTrainingSession(fabric=42)


def _resumable(n: int = 16, batch_size: int = 2) -> ResumableBatches:
    from lightning_models import dataset

    x, y = dataset(n, 0).tensors
    return ResumableBatches([(x[i:i + batch_size], y[i:i + batch_size])
                             for i in range(0, n, batch_size)])


@pytest.mark.parametrize("val_check_interval", [None, 3, 4])
def test_a_lightning_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(
    tmp_path, val_check_interval
):
    """With a resumable loader, a checkpoint written with or without a validation after its
    batch restarts at the next batch: the weights end where an uninterrupted run's do."""
    class Module(make_module_class()):
        def train_dataloader(self):
            return _resumable()

    def run(max_steps, directory, ckpt_path=None):
        torch.manual_seed(0)
        extra = ({"val_check_interval": val_check_interval} if val_check_interval
                 else {"limit_val_batches": 0})
        saver = CheckpointSaverHook(str(directory), save_steps=3)
        trainer = make_trainer(max_steps=max_steps, max_epochs=-1, **extra,
                               callbacks=[HookCallback([saver])])
        module = Module()
        trainer.fit(module, ckpt_path=ckpt_path)
        return module

    uninterrupted = run(10, tmp_path / "a")
    run(5, tmp_path / "b")  # step 3's checkpoint written mid-run, not at the end
    resumed = run(10, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "model.ckpt-3"))
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
