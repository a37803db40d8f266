"""Session rules that live once, in the core, and hold in every adapter."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from lightning_models import make_module_class, make_trainer
from torch import nn

from lightning_finalops import (
    CheckpointSaverHook,
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


@pytest.mark.parametrize("name", ["val_loss"])
def test_the_end_of_a_session_never_crashes_on_a_name_no_run_produced(name, caplog):
    hook = FinalOpsHook({"loss": name, "one": lambda: torch.ones(())})
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        with MonitoredSession([hook, StopAtStepHook(last_step=1)]) as sess:
            sess.run(lambda: {"loss": torch.zeros(())})
    step, values = hook.final_ops_history[-1]
    assert step == 1 and values["loss"] is None and float(values["one"]) == 1.0
    assert any(name in r.getMessage() for r in caplog.records)
