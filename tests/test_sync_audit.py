"""``audit_syncs()``: the per-step path of both adapters and of every standard hook is sync-free.

On a CPU the audit counts the operations that make the host wait on a GPU (``item``,
``bool(tensor)``, copies to the CPU, ``to_host``...), attributed to the hook and phase whose
code ran them. "Sync-free per step" is checked as: the count outside the user's own code does
not grow with the number of runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Counter
from lightning_models import make_module_class, make_trainer

from lightning_finalops import (
    CheckpointSaverHook,
    FeedFnHook,
    FinalOpsHook,
    GlobalStepWaiterHook,
    HookCallback,
    InMemoryEvaluatorHook,
    LoggingTensorHook,
    MonitoredSession,
    NanTensorHook,
    ProfilerHook,
    SessionRunArgs,
    SessionRunHook,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
    audit_syncs,
    stop_if_no_decrease_hook,
)


class ReadsTheLoss(SessionRunHook):
    """The positive control: ``float(tensor)`` in ``after_run`` syncs once per run."""

    def before_run(self, run_context):
        return SessionRunArgs("loss")

    def after_run(self, run_context, run_values):
        float(run_values.results)


def standard_hooks(tmp_path, w):
    """Every standard hook, doing its per-run work, with its periodic work out of the way."""
    final_ops = FinalOpsHook({"w": w, "loss": "loss"})
    evaluated = FinalOpsHook({"loss": torch.zeros(())})  # two evaluations already recorded
    evaluated.load_state_dict({"final_ops_history": [(0, {"loss": torch.tensor(1.0)}),
                                                     (0, {"loss": torch.tensor(0.5)})]})
    return [
        StepCounterHook(every_n_steps=1000),
        LoggingTensorHook(["loss"], every_n_iter=1000),
        SummarySaverHook(save_steps=1000, summary_op={"loss": "loss"}),
        ProfilerHook(save_steps=1000, output_dir=str(tmp_path / "traces")),
        FeedFnHook(lambda: {w: torch.ones(w.shape)}),
        GlobalStepWaiterHook(0),
        NanTensorHook("loss", non_blocking=True),
        final_ops,
        # checks every run; each evaluation crosses to the host once, not at every check
        stop_if_no_decrease_hook(evaluated, "loss", 10**6, run_every_secs=None,
                                 run_every_steps=1),
        # evaluates at every run: its per-batch means stay on the device
        InMemoryEvaluatorHook(lambda batch: {"x": batch * 2}, lambda: [torch.ones(())],
                              every_n_iter=1),
        CheckpointSaverHook(tmp_path / "ckpt", save_steps=1000),
        Counter(),
    ]


def plain_syncs(tmp_path, runs: int, extra=()):
    w = torch.zeros(2, requires_grad=True)
    hooks = [StopAtStepHook(last_step=runs), *standard_hooks(tmp_path / str(runs), w), *extra]
    with audit_syncs() as audit:
        with MonitoredSession(hooks, modules=torch.nn.Linear(1, 1)) as sess:
            while not sess.should_stop():
                sess.run(lambda: {"loss": (w * 2).sum()})
    return audit


def ours(audit):
    return {key: n for key, n in audit.counts.items() if key[0] != "user code"}


def test_monitored_session_with_every_standard_hook_syncs_nothing_per_step(tmp_path):
    few, many = plain_syncs(tmp_path, 3), plain_syncs(tmp_path, 12)
    assert ours(few) == ours(many)  # the session's start and end only, not per run


def test_lightning_with_every_standard_hook_syncs_nothing_per_step(tmp_path):
    def fit(max_steps):
        model = make_module_class()(n_train=16)
        hooks = standard_hooks(tmp_path / str(max_steps), model.layer.bias)
        with audit_syncs() as audit:
            make_trainer(max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                         callbacks=[HookCallback(training_hooks=hooks)]).fit(model)
        return audit

    assert ours(fit(3)) == ours(fit(12))


def test_a_hook_reading_a_value_every_run_is_reported_once_per_run(tmp_path):
    audit = plain_syncs(tmp_path, 5, extra=[ReadsTheLoss()])
    assert audit.of("ReadsTheLoss", "after_run") == 5
    assert "ReadsTheLoss" in audit.table()


def test_the_positive_control_is_found_under_lightning_too():
    with audit_syncs() as audit:
        make_trainer(max_steps=4, limit_val_batches=0,
                     callbacks=[HookCallback([ReadsTheLoss()])]).fit(make_module_class()())
    assert audit.of("ReadsTheLoss", "after_run") == 4


def test_nan_tensor_hook_syncs_once_per_run_and_not_at_all_with_non_blocking():
    for non_blocking, expected in ((False, 6), (True, 0)):
        with audit_syncs() as audit:
            with MonitoredSession([StopAtStepHook(last_step=6),
                                   NanTensorHook("loss", non_blocking=non_blocking)]) as sess:
                while not sess.should_stop():
                    sess.run(lambda: {"loss": torch.tensor(1.0)})
        assert audit.of("NanTensorHook") == expected


# -- positive controls: one counted operator, once per run, charged to the hook doing it -----

_T = torch.tensor([1.0, 2.0, 0.0])
_MASK = _T > 0.5
SYNCING = {
    "item": lambda: _T[0].item(),
    "float": lambda: float(_T[0]),
    "bool": lambda: bool(_T[0]),
    "int": lambda: int(_T[0]),
    "str": lambda: str(_T),
    "f-string": lambda: f"{_T}",
    "format spec": lambda: f"{_T[0]:.2f}",
    "torch.equal": lambda: torch.equal(_T, _T),
    "torch.allclose": lambda: torch.allclose(_T, _T),
    "torch.where(cond)": lambda: torch.where(_MASK),
    "nonzero": lambda: _T.nonzero(),
    "torch.unique": lambda: torch.unique(_T),
    "masked_select": lambda: _T.masked_select(_MASK),
    "boolean index": lambda: _T[_MASK],
    "boolean assignment": lambda: _T.clone().__setitem__(_MASK, 0.0),
    "repeat_interleave": lambda: _T.repeat_interleave(torch.tensor([1, 2, 1])),
    "tolist": lambda: _T.tolist(),
    "numpy": lambda: _T.numpy(),
    "cpu": lambda: _T.cpu(),
    "to('cpu')": lambda: _T.to("cpu"),
}


class Does(SessionRunHook):
    def __init__(self, operation) -> None:
        self.operation = operation

    def after_run(self, run_context, run_values):
        self.operation()


def _audited_runs(hook, runs: int = 3, step=lambda: {"loss": torch.tensor(1.0)}):
    with audit_syncs(log=False) as audit:
        with MonitoredSession([hook]) as sess:
            for _ in range(runs):
                sess.run(step)
    return audit


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_each_counted_operator_is_charged_to_the_hook_that_does_it_once_per_run(name):
    audit = _audited_runs(Does(SYNCING[name]))
    assert audit.of("Does", "after_run") == 3, audit.table()
    assert sum(audit.counts.values()) == 3, audit.table()  # and nowhere else


def test_device_side_work_in_a_hook_is_charged_nothing():
    audit = _audited_runs(Does(lambda: (torch.isnan(_T).any(), (_T * 2).sum(),
                                        _T.repeat_interleave(2), _T[torch.tensor([0, 2])])))
    assert audit.counts == {}, audit.table()


def test_the_users_own_step_syncs_are_charged_to_the_user_not_the_package():
    def step():
        loss = torch.tensor(2.0)
        print_me = loss.item()  # the user's own sync
        return {"loss": loss, "printed": print_me}

    audit = _audited_runs(StopAtStepHook(last_step=100), runs=4, step=step)
    assert audit.of("user code", "step") == 4, audit.table()
    assert audit.of("lightning_finalops") == 0, audit.table()
