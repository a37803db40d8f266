"""``audit_syncs()``: the per-step path of both adapters and of every standard hook is sync-free.

On a CPU the audit counts the operations that make the host wait on a GPU (``item``,
``bool(tensor)``, copies to the CPU, ``to_host``...), attributed to the hook and phase whose
code ran them. "Sync-free per step" is checked as: the count outside the user's own code does
not grow with the number of runs.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import Counter, requires_cuda
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
from lightning_finalops.sync_audit import SYNCING_OPERATORS


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
# Each takes a tensor of three values (on the device under test) and syncs once.
SYNCING = {
    "item": lambda t: t[0].item(),
    "float": lambda t: float(t[0]),
    "bool": lambda t: bool(t[0]),
    "int": lambda t: int(t[0]),
    "str": lambda t: str(t),
    "f-string": lambda t: f"{t}",
    "format spec": lambda t: f"{t[0]:.2f}",
    "torch.equal": lambda t: torch.equal(t, t),
    "torch.allclose": lambda t: torch.allclose(t, t),
    "torch.where(cond)": lambda t: torch.where(t > 0.5),
    "nonzero": lambda t: t.nonzero(),
    "torch.unique": lambda t: torch.unique(t),
    "masked_select": lambda t: t.masked_select(t > 0.5),
    "boolean index": lambda t: t[t > 0.5],
    "boolean assignment": lambda t: t.clone().__setitem__(t > 0.5, 0.0),
    "repeat_interleave": lambda t: t.repeat_interleave(torch.tensor([1, 2, 1],
                                                                     device=t.device)),
    "bincount": lambda t: torch.bincount(t.long()),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(force=True),
    "cpu": lambda t: t.cpu(),
    "to('cpu')": lambda t: t.to("cpu"),
}
# The controls that are host reads (HOST_READS): one count each, whatever they do inside.
HOST_READ_CONTROLS = {"str", "f-string", "format spec", "tolist", "numpy", "cpu", "to('cpu')"}
# Each takes the same tensor and queues work on its device only.
DEVICE_SIDE = [
    lambda t: torch.isnan(t).any(),
    lambda t: (t * 2).sum(),
    lambda t: t.repeat_interleave(2),
    lambda t: t[torch.tensor([0, 2], device=t.device)],
    lambda t: t.repeat_interleave(torch.tensor([1, 2, 1], device=t.device), output_size=4),
    lambda t: torch.where(t > 0.5, t, 0.0),
]


class Does(SessionRunHook):
    def __init__(self, operation) -> None:
        self.operation = operation

    def after_run(self, run_context, run_values):
        self.operation()


def _audited_runs(hooks, runs: int = 3, step=lambda: {"loss": torch.tensor(1.0)}):
    with audit_syncs(log=False) as audit:
        with MonitoredSession(hooks if isinstance(hooks, list) else [hooks]) as sess:
            for _ in range(runs):
                sess.run(step)
    return audit


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_each_counted_operator_is_charged_to_the_hook_that_does_it_once_per_run(name):
    audit = _audited_runs(Does(lambda: SYNCING[name](_T)))
    assert audit.of("Does", "after_run") == 3, audit.table()
    assert sum(audit.counts.values()) == 3, audit.table()  # and nowhere else


def test_device_side_work_in_a_hook_is_charged_nothing():
    audit = _audited_runs(Does(lambda: [work(_T) for work in DEVICE_SIDE]))
    assert audit.counts == {}, audit.table()


def test_the_users_own_step_syncs_are_charged_to_the_user_not_the_package():
    def step():
        loss = torch.tensor(2.0)
        print_me = loss.item()  # the user's own sync
        return {"loss": loss, "printed": print_me}

    audit = _audited_runs(StopAtStepHook(last_step=100), runs=4, step=step)
    assert audit.of("user code", "step") == 4, audit.table()
    assert audit.of("lightning_finalops") == 0, audit.table()


def test_every_operator_torch_tags_as_reading_its_result_on_the_host_is_counted():
    tagged = set()
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        for overload in getattr(packet, "overloads", lambda: [])():
            tags = getattr(packet, overload).tags
            if torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags:
                tagged.add(name)
    # composite: they reach the dispatcher as the _local_scalar_dense reads they make
    tagged -= {"item", "one_hot"}
    assert tagged <= SYNCING_OPERATORS, tagged - SYNCING_OPERATORS


class Fetches(SessionRunHook):
    def before_run(self, run_context):
        return SessionRunArgs(lambda: _T[0].item())


def test_a_hooks_fetch_is_charged_to_the_fetch_evaluation_and_begin_end_to_their_hook():
    class AtTheEnds(SessionRunHook):
        def begin(self):
            _T[0].item()

        def end(self, session):
            _T.tolist()

    audit = _audited_runs([Fetches(), AtTheEnds()], runs=4)
    assert audit.counts == {("hooks' fetches", "fetch evaluation"): 4,
                            ("AtTheEnds", "begin"): 1, ("AtTheEnds", "end"): 1}, audit.table()


def test_a_hooks_worker_threads_are_counted_and_charged_to_the_hook():
    class Threads(SessionRunHook):
        def __init__(self):
            self.pending = None

        def before_run(self, run_context):
            if self.pending is not None:  # started in the last after_run, joined now
                self.pending.join()

        def after_run(self, run_context, run_values):
            with ThreadPoolExecutor(2) as pool:  # a pool of its own, joined here
                list(pool.map(lambda i: _T[i].item(), range(2)))
            self.pending = threading.Thread(target=lambda: bool(_T[0]))
            self.pending.start()

        def end(self, session):
            self.pending.join()

    audit = _audited_runs(Threads(), runs=3)
    assert audit.counts == {("Threads", "after_run"): 9}, audit.table()


def test_a_thread_still_running_when_the_audit_ends_is_named(caplog):
    release = threading.Event()
    with caplog.at_level("WARNING", logger="lightning_finalops"):
        with audit_syncs(log=False):
            worker = threading.Thread(target=release.wait, name="slow-worker")
            worker.start()
    release.set()
    worker.join()
    assert "1 thread(s) it started still run (slow-worker)" in caplog.text


def test_the_user_step_is_the_users_whatever_hooks_run_and_the_audit_starts_cuda_never():
    class EndOnly(SessionRunHook):
        def end(self, session):
            pass

    def step():
        return {"loss": torch.tensor(1.0).item()}

    assert _audited_runs(EndOnly(), runs=2, step=step).counts == {("user code", "step"): 2}
    # a run with fetch structures: its callables are the user's too
    with audit_syncs(log=False) as audit:
        with MonitoredSession([Fetches()]) as sess:
            sess.run({"a": lambda: _T[1].item()})
    assert audit.counts == {("user code", "step"): 1,
                            ("hooks' fetches", "fetch evaluation"): 1}, audit.table()
    assert not torch.cuda.is_initialized()


def test_an_evaluations_step_is_the_users_and_its_hooks_are_theirs():
    def eval_step(batch):
        return {"x": batch * batch.item()}

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [torch.ones(()), torch.ones(())],
                                      hooks=[Does(lambda: _T[0].item())], every_n_iter=1,
                                      modules=[torch.nn.Linear(1, 1)])
    audit = _audited_runs(evaluator, runs=2)
    # evaluations at creation, after each run and at the end: 4, of 2 batches each
    assert audit.counts == {("user code", "step"): 8, ("Does", "after_run"): 8}, audit.table()


# -- on CUDA (benchmarks/gpu_check.py runs these): the same controls, checked against torch ---

@requires_cuda
@pytest.mark.parametrize("name", sorted(SYNCING))
def test_on_cuda_each_control_is_counted_as_torch_reports_it_once_per_run(name):
    on_cuda = _T.cuda()
    reported = _torch_reported_syncs(lambda: SYNCING[name](on_cuda))
    assert reported >= 1  # it really syncs
    audit = _audited_runs(Does(lambda: SYNCING[name](on_cuda)))
    # a host read counts once however many waits it makes inside; an operator counts as
    # torch's own report does (the dispatcher's count is not added to it)
    expected = 3 if name in HOST_READ_CONTROLS else 3 * reported
    assert audit.of("Does", "after_run") == expected, audit.table()
    assert sum(audit.counts.values()) == expected, audit.table()


@requires_cuda
def test_on_cuda_device_side_work_is_charged_nothing_and_torch_agrees():
    on_cuda = _T.cuda()
    audit = _audited_runs(Does(lambda: [work(on_cuda) for work in DEVICE_SIDE]))
    assert audit.counts == {}, audit.table()
    assert _torch_reported_syncs(lambda: [work(on_cuda) for work in DEVICE_SIDE]) == 0


def _torch_reported_syncs(operation) -> int:
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            operation()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


@requires_cuda
def test_an_audit_of_cpu_tensors_leaves_cuda_uninitialised():
    code = ("import torch\n"
            "from lightning_finalops import audit_syncs\n"
            "with audit_syncs(log=False) as audit:\n"
            "    torch.ones(2).sum().item()\n"
            "assert audit.of('user code') == 1, audit.table()\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_audit_changes_nothing_a_run_does_with_str_feeds_or_a_step_fn():
    class FeedsX(SessionRunHook):  # a str feed for a fetch of its own, not for the step
        def before_run(self, run_context):
            return SessionRunArgs(lambda x: x, feed_dict={"x": 1})

    def step():
        return {"loss": torch.tensor(1.0)}

    audit = _audited_runs(FeedsX(), runs=2, step=step)  # the step takes no x: not given one
    assert audit.counts == {}, audit.table()

    def step_fn(step_context):
        _T[0].item()  # the user's own code, outside run_with_hooks
        return step_context.run_with_hooks(lambda: _T[1].item())

    with audit_syncs(log=False) as audit:
        with MonitoredSession([Does(lambda: _T.tolist())]) as sess:
            sess.run_step_fn(step_fn)
    assert audit.counts == {("user code", "step"): 2, ("Does", "after_run"): 1}, audit.table()
