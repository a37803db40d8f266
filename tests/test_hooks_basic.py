"""TF's ``basic_session_run_hooks_test.py`` cases for the logging, stop, NaN, waiter and feed hooks.

Each hook runs under ``MonitoredSession`` with plain tensors as the "graph", with time and
sleeping controlled through the hook modules (no real waiting), and once in a real
``Trainer.fit``.
"""

from __future__ import annotations

import logging
from typing import Any, List

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from lightning_models import make_module_class, make_trainer

import lightning_finalops.hooks.stop as stop_module
import lightning_finalops.hooks.tensor_logging as logging_module
import lightning_finalops.hooks.timers as timers
from lightning_finalops import HookCallback, MonitoredSession, SessionRunArgs, SessionRunHook
from lightning_finalops.fetches import to_host
from lightning_finalops.hooks.feed import FeedFnHook
from lightning_finalops.hooks.stop import (
    GlobalStepWaiterHook,
    NanLossDuringTrainingError,
    NanTensorHook,
    StopAtStepHook,
)
from lightning_finalops.hooks.tensor_logging import LoggingTensorHook

MOCK_START_TIME = 1484695987.209386
LOGGER = "lightning_finalops"


# -- helpers -------------------------------------------------------------------------------------


class FakeClock:
    """Stands in for ``timers.clock``: time moves only when a test moves it."""

    def __init__(self, now: float = MOCK_START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timers, "clock", fake)
    return fake


@pytest.fixture
def logs(caplog):
    """The messages logged on the ``lightning_finalops`` logger (INFO and up), cleared at will."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    class Logs:
        def messages(self) -> List[str]:
            return [r.getMessage() for r in caplog.records if r.name == LOGGER]

        def records(self) -> List[logging.LogRecord]:
            return [r for r in caplog.records if r.name == LOGGER]

        def clear(self) -> None:
            caplog.clear()

    return Logs()


class Recorder(SessionRunHook):
    """Appends the name of every method called to ``log``."""

    def __init__(self, log: List[str]) -> None:
        self.log = log

    def begin(self) -> None:
        self.log.append("begin")

    def before_run(self, run_context):
        self.log.append("before_run")

    def after_run(self, run_context, run_values) -> None:
        self.log.append("after_run")

    def end(self, session) -> None:
        self.log.append("end")


class CountingToHost:
    """Wraps ``to_host`` in a hook module to count the transfers it makes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, values: Any) -> Any:
        self.calls += 1
        return to_host(values)


def session_at(step: int, hooks: List[SessionRunHook]) -> MonitoredSession:
    """A session whose global step starts at ``step`` (as if restored from a checkpoint)."""
    return MonitoredSession(hooks, state={"global_step": step, "hooks": {}})


def set_global_step(sess: MonitoredSession, step: int) -> None:
    """Move the session's global step, as TF's tests assign the global step variable."""
    sess.load_state_dict({"global_step": step, "hooks": {}}, strict=False)


def no_op() -> dict:
    return {}


def run_until_stop(sess: MonitoredSession, limit: int = 100) -> int:
    """Run until a hook stops the session; return the number of runs (a broken stop fails)."""
    runs = 0
    while not sess.should_stop():
        assert runs < limit, f"no stop after {limit} runs"
        sess.run(no_op)
        runs += 1
    return runs


def returns_foo() -> dict:
    return {"foo": torch.tensor(42.0)}


# -- StopAtStepHook ------------------------------------------------------------------------------


def test_stop_at_step_raises_when_neither_num_steps_nor_last_step_is_given():
    with pytest.raises(ValueError, match=r"^One of num_steps or last_step must be specified\.$"):
        StopAtStepHook()


def test_stop_at_step_raises_when_both_num_steps_and_last_step_are_given():
    with pytest.raises(
        ValueError, match=r"^Only one of num_steps or last_step can be specified\.$"
    ):
        StopAtStepHook(num_steps=10, last_step=20)


def test_stop_at_step_rejects_a_step_that_is_not_an_int():
    with pytest.raises(TypeError, match="last_step must be an int"):
        StopAtStepHook(last_step=2.5)


def test_stop_at_step_fetches_nothing():
    hook = StopAtStepHook(last_step=3)
    with MonitoredSession([hook]) as sess:
        assert hook.before_run(None) is None
        sess.run(no_op)


def test_stop_based_on_last_step():
    # TF: global step 5 -> no stop, 9 -> no stop, 10 -> stop, 11 -> stop. Our runs add one
    # to the step, so the step is set to one less before each run.
    hook = StopAtStepHook(last_step=10)
    with session_at(5, [hook]) as sess:
        sess.run(no_op)  # global step 6
        assert not sess.should_stop()
        set_global_step(sess, 8)
        sess.run(no_op)  # 9
        assert not sess.should_stop()
        set_global_step(sess, 9)
        sess.run(no_op)  # 10
        assert sess.should_stop()
    with session_at(10, [StopAtStepHook(last_step=10)]) as sess:
        sess.run(no_op)  # 11: past the last step
        assert sess.should_stop()


def test_stop_based_on_num_steps_counts_from_the_step_at_session_creation():
    hook = StopAtStepHook(num_steps=10)
    with session_at(5, [hook]) as sess:
        assert hook.last_step == 15
        sess.run(no_op)  # 6
        assert not sess.should_stop()
        set_global_step(sess, 12)
        sess.run(no_op)  # 13
        assert not sess.should_stop()
        sess.run(no_op)  # 14
        assert not sess.should_stop()
        sess.run(no_op)  # 15
        assert sess.should_stop()


def test_stop_based_on_num_steps_with_a_jump_over_several_steps():
    with session_at(5, [StopAtStepHook(num_steps=10)]) as sess:
        sess.run(no_op)
        assert not sess.should_stop()
        set_global_step(sess, 14)
        sess.run(no_op)  # 15
        assert sess.should_stop()


def test_last_step_five_from_step_zero_runs_exactly_five_times():
    with MonitoredSession([StopAtStepHook(last_step=5)]) as sess:
        runs = run_until_stop(sess)
    assert runs == 5
    assert sess.global_step == 5


def test_num_steps_three_from_step_ten_runs_to_thirteen():
    with session_at(10, [StopAtStepHook(num_steps=3)]) as sess:
        run_until_stop(sess)
    assert sess.global_step == 13


def test_num_steps_is_counted_again_in_each_new_session():
    hook = StopAtStepHook(num_steps=2)
    with MonitoredSession([hook]) as sess:
        run_until_stop(sess)
    assert sess.global_step == 2
    with session_at(2, [hook]) as sess:
        run_until_stop(sess)
    assert sess.global_step == 4


def test_stop_at_last_step_stops_fit_at_that_global_step():
    trainer = make_trainer(max_epochs=5, limit_val_batches=0,
                           callbacks=[HookCallback([StopAtStepHook(last_step=3)])])
    trainer.fit(make_module_class()())
    assert trainer.global_step == 3


def test_stop_at_num_steps_after_resume_stops_num_steps_after_the_restored_step(tmp_path):
    trainer = make_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "step4.ckpt")
    trainer.save_checkpoint(ckpt)
    assert trainer.global_step == 4

    trainer = make_trainer(max_epochs=5, limit_val_batches=0,
                           callbacks=[HookCallback([StopAtStepHook(num_steps=2)])])
    trainer.fit(make_module_class()(), ckpt_path=ckpt)
    assert trainer.global_step == 6


# -- LoggingTensorHook ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(every_n_iter=0), dict(every_n_iter=-10)])
def test_logging_rejects_a_non_positive_every_n_iter(kwargs):
    with pytest.raises(ValueError, match=r"^invalid every_n_iter=-?\d+\.$"):
        LoggingTensorHook(tensors=["t"], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(every_n_iter=5, every_n_secs=5), dict()])
def test_logging_needs_at_end_or_exactly_one_of_every_n_iter_and_every_n_secs(kwargs):
    message = (
        r"^either at_end and/or exactly one of every_n_iter and every_n_secs must be provided\.$"
    )
    with pytest.raises(ValueError, match=message):
        LoggingTensorHook(tensors=["t"], **kwargs)


def test_logging_names_the_position_of_a_fetch_that_cannot_be_fetched():
    with pytest.raises(TypeError, match=r"tensors\['loss'\]"):
        LoggingTensorHook({"loss": 3}, every_n_iter=1)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        LoggingTensorHook(["loss", object()], every_n_iter=1)


def test_logging_rejects_tensors_that_are_not_a_dict_or_a_list():
    with pytest.raises(TypeError, match="tensors must be a dict"):
        LoggingTensorHook("loss", every_n_iter=1)


def test_logging_at_end_only_logs_nothing_during_runs_and_logs_at_end(logs):
    hook = LoggingTensorHook(tensors=["foo"], at_end=True)
    with MonitoredSession([hook]) as sess:
        for _ in range(3):
            sess.run(returns_foo)
            assert logs.messages() == []
    assert logs.messages() == ["foo = 42.0"]


def _validate_print_every_n_steps(hook, logs, at_end: bool) -> None:
    with MonitoredSession([hook]) as sess:
        logs.clear()
        sess.run(returns_foo)
        assert logs.messages() and "foo" in logs.messages()[-1]
        for _ in range(3):
            logs.clear()
            for _ in range(9):
                sess.run(returns_foo)
                assert logs.messages() == []
            sess.run(returns_foo)
            assert logs.messages() and "foo" in logs.messages()[-1]
        logs.clear()
        sess.run(returns_foo)
        assert logs.messages() == []
        logs.clear()
    if at_end:
        assert logs.messages() and "foo" in logs.messages()[-1]
    else:
        assert logs.messages() == []


@pytest.mark.parametrize("at_end", [False, True])
def test_logging_every_10_iterations_and_again_after_begin(logs, at_end):
    hook = LoggingTensorHook(tensors=["foo"], every_n_iter=10, at_end=at_end)
    _validate_print_every_n_steps(hook, logs, at_end)
    _validate_print_every_n_steps(hook, logs, at_end)  # begin() reset the schedule


def test_logging_first_run_has_no_elapsed_time(logs):
    hook = LoggingTensorHook(tensors={"foo": torch.tensor(42.0)}, every_n_iter=1)
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert logs.messages() == ["foo = 42.0"]
    assert "sec" not in logs.messages()[0]


def _validate_print_every_n_secs(hook, logs, clock, at_end: bool) -> None:
    with MonitoredSession([hook]) as sess:
        logs.clear()
        sess.run(returns_foo)
        assert logs.messages() == ["foo = 42.0"]
        logs.clear()
        sess.run(returns_foo)
        assert logs.messages() == []
        clock.now += 1.0
        sess.run(returns_foo)
        assert logs.messages() == ["foo = 42.0 (1.000 sec)"]
        logs.clear()
    if at_end:
        assert logs.messages() and "foo = 42.0" in logs.messages()[-1]
    else:
        assert logs.messages() == []


@pytest.mark.parametrize("at_end", [False, True])
def test_logging_every_n_secs_follows_the_clock(logs, clock, at_end):
    hook = LoggingTensorHook(tensors=["foo"], every_n_secs=1.0, at_end=at_end)
    _validate_print_every_n_secs(hook, logs, clock, at_end)
    _validate_print_every_n_secs(hook, logs, clock, at_end)  # begin() reset the timer


def test_logging_formatter_replaces_the_text(logs):
    hook = LoggingTensorHook(tensors=["foo"], every_n_iter=10,
                             formatter=lambda items: f"qqq={items['foo']}")
    with MonitoredSession([hook]) as sess:
        sess.run(returns_foo)
    assert logs.messages() == ["qqq=42.0"]


def test_logging_formatter_receives_numpy_values(logs):
    seen = {}
    hook = LoggingTensorHook({"v": torch.tensor([1.0, 2.0])}, every_n_iter=1,
                             formatter=lambda values: seen.update(values) or "ok")
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert isinstance(seen["v"], np.ndarray) and seen["v"].tolist() == [1.0, 2.0]
    assert logs.messages() == ["ok"]


def test_logging_formatter_runs_under_tf_print_options(logs):
    hook = LoggingTensorHook({"v": torch.tensor([1e-8, 1.0])}, every_n_iter=1,
                             formatter=lambda values: str(values["v"]))
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert "e-08" not in logs.messages()[0]  # suppress=True, as TF formatted: 0.00000001
    assert np.get_printoptions()["suppress"] is False  # restored afterwards


def test_logging_every_2_iterations_logs_runs_1_3_5(logs):
    step = torch.tensor(0.0)
    hook = LoggingTensorHook({"step": step}, every_n_iter=2)
    with MonitoredSession([hook]) as sess:
        for _ in range(6):
            step.add_(1)
            sess.run(no_op)
    assert [m.split(" (")[0] for m in logs.messages()] == [
        "step = 1.0", "step = 3.0", "step = 5.0"
    ]


def test_logging_fetches_only_on_logging_runs():
    evaluations = []
    requests = []

    class Probe(LoggingTensorHook):
        def before_run(self, run_context):
            requests.append(super().before_run(run_context))
            return requests[-1]

    hook = Probe({"x": lambda: evaluations.append(1) or torch.tensor(1.0)}, every_n_iter=3)
    with MonitoredSession([hook]) as sess:
        for _ in range(7):
            sess.run(no_op)
    assert [r is not None for r in requests] == [True, False, False, True, False, False, True]
    assert len(evaluations) == 3  # runs 1, 4, 7


def test_logging_brings_all_values_to_the_host_in_one_transfer(monkeypatch):
    counting = CountingToHost()
    monkeypatch.setattr(logging_module, "to_host", counting)
    hook = LoggingTensorHook({"a": torch.tensor(1.0), "b": torch.ones(3), "c": "loss"},
                             every_n_iter=2)
    with MonitoredSession([hook]) as sess:
        for _ in range(5):
            sess.run(lambda: {"loss": torch.tensor(0.5)})
    assert counting.calls == 3  # one per logging run, not one per value


def test_logging_prints_numbers_as_numpy_does_with_suppress(logs):
    hook = LoggingTensorHook(
        {"loss": torch.tensor(0.25), "vec": torch.tensor([1e-5, 1.0]), "n": torch.tensor(3)},
        every_n_iter=1,
    )
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert logs.messages() == ["loss = 0.25, n = 3, vec = [0.00001 1.     ]"]


@requires_cuda
def test_logging_cuda_values_are_logged_as_on_the_cpu(logs):
    hook = LoggingTensorHook(
        {"loss": torch.tensor(0.25, device="cuda"), "vec": torch.ones(2, device="cuda")},
        every_n_iter=1,
    )
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert logs.messages() == ["loss = 0.25, vec = [1. 1.]"]


def test_logging_dict_tags_are_logged_in_sorted_order(logs):
    hook = LoggingTensorHook({"b": torch.tensor(2.0), "a": torch.tensor(1.0)}, every_n_iter=1)
    with MonitoredSession([hook]) as sess:
        sess.run(no_op)
    assert logs.messages() == ["a = 1.0, b = 2.0"]


def test_logging_list_items_are_tagged_by_name_function_name_or_position(logs):
    def norm():
        return torch.tensor(2.0)

    hook = LoggingTensorHook(["foo", torch.tensor(1.0), norm, lambda: torch.tensor(3.0)],
                             every_n_iter=1)
    with MonitoredSession([hook]) as sess:
        sess.run(returns_foo)
    assert logs.messages() == ["foo = 42.0, tensors[1] = 1.0, norm = 2.0, tensors[3] = 3.0"]


def test_logging_at_end_evaluates_again_through_the_raw_session(logs):
    counter = torch.tensor(0.0)
    hook = LoggingTensorHook({"n": lambda: counter.add_(1)}, every_n_iter=1, at_end=True)
    with MonitoredSession([hook]) as sess:
        for _ in range(5):
            sess.run(no_op)
    # the fetch ran in each of the 5 logged runs, then once more at end (TF: 5 -> 6)
    assert [m.split(" (")[0] for m in logs.messages()] == [f"n = {i}.0" for i in range(1, 7)]


def test_logging_loss_every_2_iterations_in_fit(logs):
    losses: List[float] = []

    class LossSpy(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs("loss")

        def after_run(self, run_context, run_values) -> None:
            losses.append(to_host(run_values.results).numpy()[()])

    hooks = [LoggingTensorHook({"loss": "loss"}, every_n_iter=2), LossSpy()]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback(hooks)])
    trainer.fit(make_module_class()(n_train=8))
    messages = logs.messages()
    assert len(losses) == 4 and len(messages) == 2
    assert messages[0] == f"loss = {losses[0]!s}"
    assert messages[1].startswith(f"loss = {losses[2]!s} (") and messages[1].endswith(" sec)")


# -- NanTensorHook -------------------------------------------------------------------------------


def nan_step() -> dict:
    return {"loss": torch.tensor(float("nan"))}


def test_nan_loss_error_is_a_runtime_error_with_tf_text():
    error = NanLossDuringTrainingError()
    assert isinstance(error, RuntimeError)
    assert str(error) == "NaN loss during training."


def test_nan_tensor_hook_rejects_a_loss_that_cannot_be_fetched():
    with pytest.raises(TypeError, match="loss_tensor"):
        NanTensorHook(None)
    with pytest.raises(TypeError, match="loss_tensor"):
        NanTensorHook(1.5)


def test_nan_loss_fails_skipping_later_after_runs_and_every_end(logs):
    log: List[str] = []
    with pytest.raises(NanLossDuringTrainingError, match=r"^NaN loss during training\.$"):
        with MonitoredSession([NanTensorHook("loss"), Recorder(log)]) as sess:
            sess.run(nan_step)
    assert log == ["begin", "before_run"]
    (record,) = logs.records()
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR, "Model diverged with loss = NaN."
    )


def test_nan_loss_without_fail_requests_a_stop_and_ends_cleanly(logs):
    log: List[str] = []
    with MonitoredSession([NanTensorHook("loss", fail_on_nan_loss=False), Recorder(log)]) as sess:
        result = sess.run(nan_step)
        assert sess.should_stop()
    assert torch.isnan(result["loss"])  # the run returns the NaN
    assert log == ["begin", "before_run", "after_run", "end"]
    (record,) = logs.records()
    assert (record.levelno, record.getMessage()) == (
        logging.WARNING, "Model diverged with loss = NaN."
    )


def test_finite_loss_neither_fails_nor_stops(logs):
    weight = torch.tensor([1.0, 2.0])
    with MonitoredSession([NanTensorHook(weight)]) as sess:
        for _ in range(3):
            sess.run(no_op)
        assert not sess.should_stop()
    assert logs.messages() == []


def test_nan_in_any_element_of_a_loss_tensor_is_detected():
    loss = torch.tensor([1.0, float("nan"), 3.0])
    with pytest.raises(NanLossDuringTrainingError):
        with MonitoredSession([NanTensorHook(loss)]) as sess:
            sess.run(no_op)


def test_nan_check_makes_one_transfer_per_run(monkeypatch):
    counting = CountingToHost()
    monkeypatch.setattr(stop_module, "to_host", counting)
    with MonitoredSession([NanTensorHook("loss")]) as sess:
        for i in range(4):
            sess.run(lambda i=i: {"loss": torch.tensor(float(i))})
    assert counting.calls == 4


@requires_cuda
def test_nan_loss_on_cuda_is_detected():
    loss = torch.tensor(float("nan"), device="cuda")
    with pytest.raises(NanLossDuringTrainingError):
        with MonitoredSession([NanTensorHook("loss")]) as sess:
            sess.run(lambda: {"loss": loss * 1})


def nan_module_class():
    base = make_module_class()

    class NanFromSecondBatch(base):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if self.global_step >= 1:
                out["loss"] = out["loss"] * float("nan")
            return out

    return NanFromSecondBatch


def test_nan_loss_in_fit_raises_out_of_fit():
    trainer = make_trainer(max_epochs=3, limit_val_batches=0,
                           callbacks=[HookCallback([NanTensorHook("loss")])])
    with pytest.raises(NanLossDuringTrainingError):
        trainer.fit(nan_module_class()())
    assert trainer.global_step == 2


def test_nan_loss_in_fit_without_fail_stops_fit():
    hook = NanTensorHook("loss", fail_on_nan_loss=False)
    trainer = make_trainer(max_epochs=3, limit_val_batches=0, callbacks=[HookCallback([hook])])
    trainer.fit(nan_module_class()())
    assert trainer.global_step == 2  # 12 without the stop


# -- GlobalStepWaiterHook ------------------------------------------------------------------------


class Sleeps:
    """Stands in for ``stop.sleep``: records each call and runs the next side effect."""

    def __init__(self, *effects) -> None:
        self.effects = list(effects)
        self.calls: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if not self.effects:
            raise AssertionError("slept more often than expected")
        self.effects.pop(0)()


def test_waiter_does_not_wait_for_step_zero(monkeypatch):
    sleeps = Sleeps()
    monkeypatch.setattr(stop_module, "sleep", sleeps)
    with MonitoredSession([GlobalStepWaiterHook(wait_until_step=0)]) as sess:
        sess.run(no_op)
    assert sleeps.calls == []


def test_waiter_polls_the_global_step_every_half_second_until_reached(monkeypatch, logs):
    holder: List[MonitoredSession] = []
    sleeps = Sleeps(lambda: set_global_step(holder[0], 500),
                    lambda: set_global_step(holder[0], 1100))
    monkeypatch.setattr(stop_module, "sleep", sleeps)
    with MonitoredSession([GlobalStepWaiterHook(wait_until_step=1000)]) as sess:
        holder.append(sess)
        sess.run(no_op)
    assert sleeps.calls == [0.5, 0.5]
    assert sess.global_step == 1101  # the run happened after the wait
    assert logs.messages() == ["Waiting for global step 1000 before starting training."]


def test_waiter_logs_progress_every_1000_steps(monkeypatch, logs):
    holder: List[MonitoredSession] = []
    sleeps = Sleeps(*(lambda s=s: set_global_step(holder[0], s) for s in (1500, 2000, 3000, 5000)))
    monkeypatch.setattr(stop_module, "sleep", sleeps)
    with MonitoredSession([GlobalStepWaiterHook(wait_until_step=5000)]) as sess:
        holder.append(sess)
        sess.run(no_op)
    assert logs.messages() == [
        "Waiting for global step 5000 before starting training.",
        "Waiting for global step 5000 before starting training. Current step is 1500.",
        "Waiting for global step 5000 before starting training. Current step is 3000.",
    ]


def test_waiter_waits_only_until_started_once_per_session(monkeypatch):
    holder: List[MonitoredSession] = []
    sleeps = Sleeps(lambda: set_global_step(holder[0], 3),
                    lambda: set_global_step(holder[0], 3))
    monkeypatch.setattr(stop_module, "sleep", sleeps)
    hook = GlobalStepWaiterHook(wait_until_step=3)
    with MonitoredSession([hook]) as sess:
        holder.append(sess)
        sess.run(no_op)
        set_global_step(sess, 0)  # below the step again: no more waiting in this session
        sess.run(no_op)
    assert len(sleeps.calls) == 1
    with MonitoredSession([hook]) as sess:  # begin(): a new session waits again
        holder[0] = sess
        sess.run(no_op)
    assert len(sleeps.calls) == 2


def test_waiter_rejects_a_step_that_is_not_an_int():
    with pytest.raises(TypeError, match="wait_until_step must be an int"):
        GlobalStepWaiterHook("10")


def test_waiter_blocks_the_first_batch_of_fit(monkeypatch):
    class Waited(Exception):
        pass

    def sleep(seconds: float) -> None:
        raise Waited(seconds)

    monkeypatch.setattr(stop_module, "sleep", sleep)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([GlobalStepWaiterHook(100)])])
    with pytest.raises(Waited):
        trainer.fit(make_module_class()())
    assert trainer.global_step == 0  # no step ran while waiting


def test_waiter_lets_a_run_resumed_past_the_step_start_at_once(monkeypatch, tmp_path):
    trainer = make_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "step4.ckpt")
    trainer.save_checkpoint(ckpt)
    sleeps = Sleeps()
    monkeypatch.setattr(stop_module, "sleep", sleeps)
    trainer = make_trainer(max_epochs=2, limit_val_batches=0,
                           callbacks=[HookCallback([GlobalStepWaiterHook(4)])])
    trainer.fit(make_module_class()(), ckpt_path=ckpt)
    assert sleeps.calls == []
    assert trainer.global_step == 8


# -- FeedFnHook ----------------------------------------------------------------------------------


def test_feed_fn_feeds_a_tensor_for_the_run():
    x = torch.tensor(0.0)
    with MonitoredSession([FeedFnHook(feed_fn=lambda: {x: 1.0})]) as sess:
        assert sess.run(lambda: x + 1).item() == 2.0
    assert x.item() == 0.0  # restored after the run


def test_feed_fn_feeds_a_str_to_the_step():
    with MonitoredSession([FeedFnHook(lambda: {"scale": 3.0})]) as sess:
        assert sess.run(lambda scale: scale * 2) == 6.0


def test_feed_fn_is_called_once_per_run():
    calls = []
    x = torch.tensor(0.0)

    def feed_fn():
        calls.append(1)
        return {x: float(len(calls))}

    with MonitoredSession([FeedFnHook(feed_fn)]) as sess:
        seen = [sess.run(lambda: x * 1).item() for _ in range(3)]
    assert seen == [1.0, 2.0, 3.0]
    assert len(calls) == 3


def test_feed_fn_feeding_the_same_tensor_as_another_hook_conflicts():
    x = torch.tensor(0.0)
    hooks = [FeedFnHook(lambda: {x: 1.0}), FeedFnHook(lambda: {x: 2.0})]
    with pytest.raises(RuntimeError, match=r"^Same tensor is fed by two hooks\. Conflict"):
        with MonitoredSession(hooks) as sess:
            sess.run(lambda: x * 1)


def test_feed_fn_feeding_the_same_tensor_as_the_user_conflicts():
    x = torch.tensor(0.0)
    with pytest.raises(
        RuntimeError, match=r"^Same tensor is fed by a SessionRunHook and user\. Conflict"
    ):
        with MonitoredSession([FeedFnHook(lambda: {x: 1.0})]) as sess:
            sess.run(lambda: x * 1, feed_dict={x: 5.0})


def test_feed_fn_must_be_callable():
    with pytest.raises(TypeError, match="feed_fn must be a callable"):
        FeedFnHook({"scale": 3.0})


def test_feed_fn_sets_a_str_feed_on_each_dict_batch_in_fit():
    scales = iter([1.0, 2.0, 3.0, 4.0])
    model = make_module_class()(n_train=8, dict_batches=True)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([FeedFnHook(lambda: {"scale": next(scales)})])])
    trainer.fit(model)
    assert model.seen_scale == [1.0, 2.0, 3.0, 4.0]


def test_a_session_restored_at_or_past_last_step_runs_no_step(caplog) -> None:
    for restored in (5, 7):
        hook = StopAtStepHook(last_step=5)
        with caplog.at_level(logging.INFO, logger="lightning_finalops"):
            with session_at(restored, [hook]) as sess:
                assert sess.should_stop()  # before the first run: a finished job is a no-op
        assert sess.global_step == restored
        assert (f"The job is finished at global step {restored} (StopAtStepHook)"
                in caplog.text)
    with session_at(4, [StopAtStepHook(last_step=5)]) as sess:
        assert not sess.should_stop()
        sess.run(lambda: None)
        assert sess.should_stop()
