"""``FinalOpsHook``: TF's ``basic_session_run_hooks_test.py`` cases and tf_semantics.md §6-§7."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_batches, requires_cuda
from torchmetrics import MeanMetric

from lightning_finalops import FinalOpsHook, MonitoredSession, SessionRunHook, to_host

WARNING_TEXT = "dependency back to some input source"


class Recorder(SessionRunHook):
    """Appends ``(name, method)`` to a shared log."""

    def __init__(self, name, log):
        self.name = name
        self.log = log

    def begin(self):
        self.log.append((self.name, "begin"))

    def before_run(self, run_context):
        self.log.append((self.name, "before_run"))

    def after_run(self, run_context, run_values):
        self.log.append((self.name, "after_run"))

    def end(self, session):
        self.log.append((self.name, "end"))


class StopAfterNRuns(SessionRunHook):
    """Requests a stop in the after_run of the n-th run (like TF's _StopAfterNEvalsHook)."""

    def __init__(self, n):
        self.n = n

    def after_run(self, run_context, run_values):
        if run_context.session.global_step >= self.n:
            run_context.request_stop()


def run_increments(hook, var, n, *extra_hooks):
    """Run a session that adds 1 to ``var`` ``n`` times, then ends cleanly."""
    with MonitoredSession([*extra_hooks, hook]) as sess:
        for _ in range(n):
            sess.run(lambda: var.add_(1))
    return sess


# -- TF's cases ----------------------------------------------------------------------------------


def test_final_ops_is_a_scalar_tensor():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(var)
    run_increments(hook, var, 3)
    assert isinstance(hook.final_ops_values, torch.Tensor)
    assert hook.final_ops_values.shape == ()
    assert hook.final_ops_values.item() == 3.0


def test_final_ops_is_an_array():
    var = torch.tensor([1.0, 2.0, 3.0])
    hook = FinalOpsHook(var)
    run_increments(hook, var, 2)
    assert hook.final_ops_values.tolist() == [3.0, 4.0, 5.0]


def test_final_ops_is_a_dict_with_a_tensor_feed():
    var = torch.tensor(0.0)
    placeholder = torch.tensor(0.0)
    hook = FinalOpsHook(
        {"a": var, "b": lambda: var * 2, "fed": lambda: placeholder + var},
        final_ops_feed_dict={placeholder: 100.0},
    )
    run_increments(hook, var, 3)
    values = hook.final_ops_values
    assert set(values) == {"a", "b", "fed"}
    assert (values["a"].item(), values["b"].item(), values["fed"].item()) == (3.0, 6.0, 103.0)
    assert placeholder.item() == 0.0  # the feed lasted for the final evaluation only


def test_final_ops_feed_with_a_str_key_is_passed_to_the_callable():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(
        {"scaled": lambda scale: var * scale, "plain": lambda: var},
        final_ops_feed_dict={"scale": 10.0},
    )
    run_increments(hook, var, 2)
    assert hook.final_ops_values["scaled"].item() == 20.0
    assert hook.final_ops_values["plain"].item() == 2.0


def test_final_ops_nested_structure_is_kept():
    var = torch.tensor(1.0)
    hook = FinalOpsHook({"x": [var, (lambda: var + 1, None)], "y": {"z": var}})
    run_increments(hook, var, 1)
    values = hook.final_ops_values
    assert isinstance(values["x"], list) and isinstance(values["x"][1], tuple)
    assert values["x"][0].item() == 2.0 and values["x"][1][0].item() == 3.0
    assert values["x"][1][1] is None
    assert values["y"]["z"].item() == 2.0


def test_final_ops_none_evaluates_nothing():
    hook = FinalOpsHook(None)
    run_increments(hook, torch.tensor(0.0), 1)
    assert hook.final_ops_values is None


def test_final_ops_values_are_a_snapshot_of_the_end():
    var = torch.tensor(0.0)
    hook = FinalOpsHook({"v": var})
    run_increments(hook, var, 2)
    var.add_(100)
    assert hook.final_ops_values["v"].item() == 2.0


# -- when the values exist -----------------------------------------------------------------------


def test_final_ops_values_are_none_until_end():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(var)
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: var.add_(1))
        assert hook.final_ops_values is None
        assert hook.final_ops_history == []
    assert hook.final_ops_values.item() == 1.0


def test_final_ops_values_stay_none_when_the_with_block_fails():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(var)
    with pytest.raises(ValueError):
        with MonitoredSession([hook]) as sess:
            sess.run(lambda: var.add_(1))
            raise ValueError("the loop failed")
    assert hook.final_ops_values is None
    assert hook.final_ops_history == []


def test_final_ops_are_evaluated_after_end_of_data_like_estimator_evaluate():
    metric = MeanMetric()
    batches = iter([1.0, 2.0, 3.0, 6.0])
    hook = FinalOpsHook({"mean": metric})
    with MonitoredSession([hook]) as sess:
        while not sess.should_stop():
            sess.run(lambda: metric.update(torch.tensor(next(batches))))
    assert hook.final_ops_values["mean"].item() == pytest.approx(3.0)
    assert sess.global_step == 4


def test_final_ops_are_evaluated_after_a_stop_request_like_estimator_evaluate_with_steps():
    metric = MeanMetric()
    batches = iter([1.0, 2.0, 3.0, 6.0])
    hook = FinalOpsHook({"mean": metric})
    with MonitoredSession([StopAfterNRuns(2), hook]) as sess:
        while not sess.should_stop():
            sess.run(lambda: metric.update(torch.tensor(next(batches))))
    assert hook.final_ops_values["mean"].item() == pytest.approx(1.5)


def test_final_ops_are_evaluated_once_after_earlier_hooks_end_and_never_per_run():
    log = []
    var = torch.tensor(0.0)

    def final_op():
        log.append(("final_op", "call"))
        return var.clone()

    hook = FinalOpsHook(final_op)
    run_increments(hook, var, 2, Recorder("h1", log))
    assert log[-2:] == [("h1", "end"), ("final_op", "call")]
    assert log.count(("final_op", "call")) == 1


def test_final_ops_run_through_the_raw_session_without_firing_hooks():
    log = []
    hook = FinalOpsHook(lambda: 1)
    with MonitoredSession([hook, Recorder("h2", log)]) as sess:
        sess.run(lambda: None)
    assert log == [
        ("h2", "begin"), ("h2", "before_run"), ("h2", "after_run"), ("h2", "end"),
    ]
    assert hook.final_ops_values == 1


def test_final_ops_can_fetch_the_last_runs_values_by_name():
    losses = iter([3.0, 2.0])
    hook = FinalOpsHook({"loss": "loss"})
    with MonitoredSession([hook]) as sess:
        while not sess.should_stop():
            sess.run(lambda: {"loss": torch.tensor(next(losses))})
    assert hook.final_ops_values["loss"].item() == 2.0


def test_closing_twice_keeps_the_values_and_raises_already_closed():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(var)
    sess = MonitoredSession([hook])
    sess.run(lambda: var.add_(1))
    sess.close()
    with pytest.raises(RuntimeError, match=r"^Session is already closed\.$"):
        sess.close()
    assert hook.final_ops_values.item() == 1.0
    assert len(hook.final_ops_history) == 1


# -- a final op that reads the exhausted input ---------------------------------------------------


def test_final_op_raising_stop_iteration_logs_the_warning_and_escapes_the_with(caplog):
    log = []
    data = iter([1, 2])
    hook = FinalOpsHook(lambda: next(data))
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        with pytest.raises(StopIteration):
            with MonitoredSession([Recorder("h1", log), hook, Recorder("h3", log)]) as sess:
                while not sess.should_stop():
                    sess.run(lambda: next(data))
    warnings = [r for r in caplog.records if r.name == "lightning_finalops"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert WARNING_TEXT in warnings[0].getMessage()
    assert ("h1", "end") in log
    assert ("h3", "end") not in log  # hooks after FinalOpsHook get no end()
    assert hook.final_ops_values is None
    assert sess.should_stop() is True  # the session is closed all the same


def test_final_op_raising_stop_iteration_inside_a_list_logs_the_warning(caplog):
    data = iter(())
    hook = FinalOpsHook([lambda: next(data)])
    sess = MonitoredSession([hook])
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        with pytest.raises(StopIteration):
            sess.close()
    assert WARNING_TEXT in caplog.text


def test_final_op_raising_another_exception_propagates_without_the_warning(caplog):
    def broken():
        raise ZeroDivisionError("bad metric")

    hook = FinalOpsHook({"m": broken})
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        with pytest.raises(ZeroDivisionError):
            with MonitoredSession([hook]) as sess:
                sess.run(lambda: None)
    assert WARNING_TEXT not in caplog.text
    assert hook.final_ops_values is None


# -- validation ----------------------------------------------------------------------------------


def test_init_rejects_a_bad_leaf_naming_its_position():
    with pytest.raises(TypeError) as info:
        FinalOpsHook({"acc": [torch.tensor(1.0), 0.5]})
    assert "final_ops['acc'][1]" in str(info.value)


def test_init_rejects_a_bad_top_level_final_ops():
    with pytest.raises(TypeError, match=r"^final_ops must be"):
        FinalOpsHook(42)


def test_init_rejects_a_final_ops_feed_dict_that_is_not_a_mapping():
    with pytest.raises(TypeError, match="final_ops_feed_dict must be a mapping"):
        FinalOpsHook(lambda: 1, final_ops_feed_dict=[("scale", 2)])


def test_init_rejects_a_final_ops_feed_dict_key_of_a_bad_type():
    with pytest.raises(TypeError, match="final_ops_feed_dict keys"):
        FinalOpsHook(lambda: 1, final_ops_feed_dict={3: 2.0})


def test_init_rejects_a_module_which_is_callable_but_no_value():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"final_ops\['model'\] is a module \(Linear\)"):
        FinalOpsHook({"model": model})
    FinalOpsHook({"w": model.weight, "metric": MeanMetric()})  # a metric is a module too


def test_init_rejects_a_metric_class_that_was_not_instantiated():
    with pytest.raises(TypeError, match=r"final_ops\['m'\] is the class MeanMetric, not an"):
        FinalOpsHook({"m": MeanMetric})


def test_init_rejects_a_callable_needing_arguments_no_str_feed_supplies():
    with pytest.raises(TypeError, match=r"final_ops\['f'\] is a callable that needs \['x'\]"):
        FinalOpsHook({"f": lambda x: x})
    hook = FinalOpsHook({"f": lambda x, y=2: x * y}, final_ops_feed_dict={"x": 3})
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: None)
    assert hook.final_ops_values == {"f": 6}


def test_final_ops_property_returns_what_was_given():
    final_ops = {"a": "loss"}
    assert FinalOpsHook(final_ops).final_ops is final_ops


# -- history and state ---------------------------------------------------------------------------


def test_final_ops_history_has_one_entry_per_session_with_its_global_step():
    var = torch.tensor(0.0)
    hook = FinalOpsHook({"v": var})
    first = run_increments(hook, var, 2)
    run_increments(hook, var, 3)
    steps = [step for step, _ in hook.final_ops_history]
    values = [v["v"].item() for _, v in hook.final_ops_history]
    assert steps == [2, 3]
    assert values == [2.0, 5.0]
    assert hook.final_ops_values is hook.final_ops_history[-1][1]
    assert first.should_stop()


def test_final_ops_history_follows_a_restored_global_step():
    var = torch.tensor(0.0)
    hook = FinalOpsHook({"v": var})
    first = run_increments(hook, var, 2)
    with MonitoredSession([hook], state=first.state_dict()) as sess:
        sess.run(lambda: var.add_(1))
    assert [step for step, _ in hook.final_ops_history] == [2, 3]


def test_state_dict_round_trip_restores_history_and_latest_values():
    var = torch.tensor(0.0)
    hook = FinalOpsHook({"v": var})
    run_increments(hook, var, 1)
    run_increments(hook, var, 1)
    restored = FinalOpsHook({"v": var})
    restored.load_state_dict(hook.state_dict())
    assert [s for s, _ in restored.final_ops_history] == [1, 1]
    assert [v["v"].item() for _, v in restored.final_ops_history] == [1.0, 2.0]
    assert restored.final_ops_values["v"].item() == 2.0


def test_state_dict_of_a_fresh_hook_restores_to_no_values():
    restored = FinalOpsHook(lambda: 1)
    restored.load_state_dict(FinalOpsHook(lambda: 1).state_dict())
    assert restored.final_ops_history == []
    assert restored.final_ops_values is None


def test_state_dict_is_a_copy_of_the_history():
    var = torch.tensor(0.0)
    hook = FinalOpsHook(var)
    state = hook.state_dict()
    run_increments(hook, var, 1)
    assert state == {"final_ops_history": []}


def test_load_state_dict_rejects_other_keys():
    with pytest.raises(ValueError, match="final_ops_history"):
        FinalOpsHook(lambda: 1).load_state_dict({"history": []})


def test_hook_state_travels_with_the_monitored_session_state():
    var = torch.tensor(0.0)
    hook = FinalOpsHook({"v": var})
    first = run_increments(hook, var, 2)
    fresh = FinalOpsHook({"v": var})
    with MonitoredSession([fresh], state=first.state_dict()) as sess:
        assert [s for s, _ in fresh.final_ops_history] == [2]
        sess.run(lambda: var.add_(1))
    assert [s for s, _ in fresh.final_ops_history] == [2, 3]
    assert fresh.final_ops_values["v"].item() == 3.0


# -- a real training loop ------------------------------------------------------------------------


def test_training_loop_gives_the_final_weight_norm_and_last_loss():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(make_batches(n=8))
    losses = []

    def train_step(batch):
        x, y = batch
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        return {"loss": loss}

    hook = FinalOpsHook({"w_norm": lambda: model.weight.norm(), "loss": "loss"})
    with MonitoredSession([hook], modules=model) as sess:
        while not sess.should_stop():
            sess.run(lambda: train_step(next(batches)))
    values = hook.final_ops_values
    assert sess.global_step == 8
    assert values["loss"].item() == pytest.approx(losses[-1])
    assert values["w_norm"].item() == pytest.approx(model.weight.detach().norm().item())
    assert not values["loss"].requires_grad and not values["w_norm"].requires_grad
    assert losses[-1] < losses[0]  # it really trained
    assert hook.final_ops_history[-1][0] == 8


@requires_cuda
def test_cuda_loop_does_not_synchronise_and_keeps_final_values_on_cuda():
    device = torch.device("cuda")
    model = torch.nn.Linear(3, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(n=6)]
    metric = MeanMetric(nan_strategy="disable").to(device)

    def train_step(batch):
        x, y = batch
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        metric.update(loss.detach())
        return {"loss": loss}

    train_step(batches[0])  # warm up CUDA, cuBLAS and the optimizer outside the check
    metric.reset()
    data = iter(batches[1:])
    hook = FinalOpsHook(
        {"w_norm": lambda: model.weight.norm(), "loss": "loss", "mean": metric, "w": model.weight}
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with MonitoredSession([hook], modules=model) as sess:
            while not sess.should_stop():
                sess.run(lambda: train_step(next(data)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    values = hook.final_ops_values
    for key in ("w_norm", "loss", "mean", "w"):
        assert values[key].device.type == "cuda", key
    assert sess.global_step == 5
    host = to_host(values)
    assert host["w_norm"].item() == pytest.approx(model.weight.detach().norm().item(), rel=1e-5)
    assert torch.allclose(host["w"], model.weight.detach().cpu())


# -- identity across resumes ---------------------------------------------------------------------


def test_each_final_ops_hook_keeps_its_own_history_when_hooks_are_added_or_reordered():
    acc, loss = FinalOpsHook({"acc": "acc"}), FinalOpsHook({"loss": "loss"})
    with MonitoredSession([acc, loss]) as sess:
        sess.run(lambda: {"acc": torch.tensor(0.5), "loss": torch.tensor(2.0)})
    state = sess.state_dict()
    added, loss_again, acc_again = (
        FinalOpsHook({"w": lambda: 1}), FinalOpsHook({"loss": "loss"}), FinalOpsHook({"acc": "acc"})
    )
    MonitoredSession([added, loss_again, acc_again], state=state)  # one added, two reordered
    assert added.final_ops_history == []
    assert loss_again.final_ops_history == [(1, {"loss": torch.tensor(2.0)})]
    assert acc_again.final_ops_history == [(1, {"acc": torch.tensor(0.5)})]


def test_a_final_ops_hook_whose_final_ops_changed_is_named_in_the_resume_error():
    with MonitoredSession([FinalOpsHook({"acc": "acc"})]) as sess:
        sess.run(lambda: {"acc": torch.tensor(0.5)})
    with pytest.raises(ValueError, match=r"saved state of \[\"FinalOpsHook\{acc='acc'\}\"\]"):
        MonitoredSession([FinalOpsHook({"accuracy": "acc"})], state=sess.state_dict())


def test_a_named_final_ops_hook_keeps_its_key_when_its_final_ops_change():
    with MonitoredSession([FinalOpsHook({"acc": "acc"}, name="eval")]) as sess:
        sess.run(lambda: {"acc": torch.tensor(0.5)})
    renamed = FinalOpsHook({"accuracy": "acc"}, name="eval")
    MonitoredSession([renamed], state=sess.state_dict())
    assert renamed.state_key == "FinalOpsHook[eval]"
    assert renamed.final_ops_history == [(1, {"acc": torch.tensor(0.5)})]


def test_a_recorded_value_never_changes_when_its_source_is_updated_in_place_later():
    w = torch.tensor(1.0, requires_grad=True)
    state = {}

    def tripled():  # autograd's fresh result, kept and updated by the user afterwards
        state["t"] = w * 3
        return state["t"]

    hook = FinalOpsHook({"t": tripled, "loss": "loss"})
    for _ in range(2):
        with MonitoredSession([hook]) as sess:
            out = sess.run(lambda: {"loss": w * 2})
        with torch.no_grad():
            state["t"].add_(3.0)  # in place, after the value was recorded
            out["loss"].add_(1.0)  # the step's own result, handed back to the caller
    assert [(step, float(v["t"]), float(v["loss"])) for step, v in hook.final_ops_history] == [
        (1, 3.0, 2.0), (1, 3.0, 2.0)
    ]


def test_max_history_keeps_the_latest_entries_in_memory_and_in_checkpoints():
    hook = FinalOpsHook({"step": lambda: 1}, max_history=2)
    for _ in range(3):
        with MonitoredSession([hook], state={"global_step": len(hook.final_ops_history),
                                             "hooks": {}}) as sess:
            sess.run(lambda: None)
    assert [step for step, _ in hook.final_ops_history] == [2, 3]
    assert [step for step, _ in hook.state_dict()["final_ops_history"]] == [2, 3]
    smaller = FinalOpsHook({"step": lambda: 1}, max_history=1)
    smaller.load_state_dict(hook.state_dict())
    assert [step for step, _ in smaller.final_ops_history] == [3]


def test_history_on_host_keeps_host_copies_and_the_latest_values_where_they_were():
    hook = FinalOpsHook({"w": lambda: torch.ones(2)}, history_on_host=True)
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: None)
    (_, entry), = hook.final_ops_history
    assert entry["w"].device.type == "cpu" and torch.equal(entry["w"], torch.ones(2))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_history": 0}, "max_history must be an int >= 1"),
    ({"max_history": 2.0}, "max_history must be an int or None"),
    ({"history_on_host": "yes"}, "history_on_host must be a bool"),
])
def test_history_arguments_are_checked(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        FinalOpsHook("loss", **kwargs)
