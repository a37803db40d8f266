"""``SummarySaverHook`` and ``StepCounterHook``: TF's ``basic_session_run_hooks_test.py`` cases.

Time is controlled through ``lightning_finalops.hooks.timers.clock``; what the hooks wrote is
read back from the events files with TensorBoard's ``EventAccumulator``.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional

import pytest
import torch
from lightning_models import make_module_class, make_trainer, pl_package
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_finalops import (
    Engine,
    HookCallback,
    HookedSession,
    MonitoredSession,
    SessionRunArgs,
    SessionRunHook,
    to_host,
)
from lightning_finalops.hooks import summary, timers
from lightning_finalops.hooks.summary import StepCounterHook, SummarySaverHook

MOCK_START_TIME = 1484695987.209386
EXACTLY_ONE = "^Exactly one of scaffold or summary_op must be provided.$"
NOT_INCREASED = "It seems that global step (tf.train.get_global_step) has not been increased."


class FakeClock:
    """A clock that moves only when the test moves it (optionally by ``tick`` per read)."""

    def __init__(self, now: float = MOCK_START_TIME, tick: float = 0.0) -> None:
        self.now, self.tick = now, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timers, "clock", fake)
    return fake


@pytest.fixture(autouse=True)
def _close_cached_writers():
    yield
    summary.SummaryWriterCache.clear()


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalars(logdir) -> Dict[int, Dict[str, float]]:
    """``{step: {tag: value}}`` of every scalar written under ``logdir``."""
    acc = events(logdir)
    out: Dict[int, Dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def run_session(hooks: List[SessionRunHook], n: int, clock: Optional[FakeClock] = None,
                secs_per_run: float = 0.0, state: Optional[Mapping[str, Any]] = None):
    """``n`` runs of a no-op step; the fake clock advances after each run (TF's tests)."""
    with MonitoredSession(hooks, state=state) as sess:
        for _ in range(n):
            sess.run(lambda: None)
            if clock is not None:
                clock.now += secs_per_run
    return sess


def counter(start: float = 0.0) -> Callable[[], torch.Tensor]:
    """TF's ``assign_add(var, 1.0)``: every evaluation adds one and returns the new value."""
    var = torch.tensor(float(start))

    def assign_add() -> torch.Tensor:
        return var.add_(1.0)

    assign_add.var = var  # type: ignore[attr-defined]
    return assign_add


class PlainSession(Engine):
    """An engine driven by hand: its global step, chief flag and loggers are the test's."""

    def __init__(self, is_chief: bool = True, advance: int = 1) -> None:
        self.step, self.chief, self.advance = 0, is_chief, advance
        self.logged: List[Any] = []

    @property
    def global_step(self) -> int:
        return self.step

    @property
    def is_chief(self) -> bool:
        return self.chief

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def drive(hooks: List[SessionRunHook], session: PlainSession, n: int) -> None:
    """Run ``n`` runs through the engine-neutral runner, advancing the step by ``advance``."""
    hooked = HookedSession(hooks, session)
    hooked.begin()
    hooked.create()
    for _ in range(n):
        hooked.start_run()
        session.step += session.advance
        hooked.finish_run(None)
    hooked.end()


# -- SummarySaverHook: validation -----------------------------------------------------------------


def test_summary_saver_without_scaffold_or_summary_op_raises_first():
    with pytest.raises(ValueError, match=EXACTLY_ONE):
        SummarySaverHook()


def test_summary_saver_with_both_scaffold_and_summary_op_raises():
    with pytest.raises(ValueError, match=EXACTLY_ONE):
        SummarySaverHook(save_steps=1, scaffold=object(), summary_op={"x": torch.ones(())})


def test_summary_saver_with_both_secs_and_steps_raises():
    with pytest.raises(ValueError, match="^Can not provide both every_secs and every_steps.$"):
        SummarySaverHook(save_secs=10, save_steps=20, summary_op={"x": torch.ones(())})


def test_summary_saver_with_neither_secs_nor_steps_raises():
    with pytest.raises(ValueError, match="^Either every_secs or every_steps should be provided.$"):
        SummarySaverHook(summary_op={"x": torch.ones(())})


def test_summary_saver_timer_errors_come_before_the_unsupported_scaffold():
    with pytest.raises(ValueError, match="^Either every_secs or every_steps"):
        SummarySaverHook(scaffold=object())


def test_summary_saver_rejects_a_scaffold_with_a_clear_error():
    with pytest.raises(ValueError, match=r"no Scaffold.*pass summary_op=\{tag: fetch\}"):
        SummarySaverHook(save_steps=1, scaffold=object())


def test_summary_op_must_be_a_dict_of_tags():
    with pytest.raises(TypeError, match=r"summary_op must be a dict \{tag: fetch\}"):
        SummarySaverHook(save_steps=1, summary_op=[torch.ones(())])
    with pytest.raises(TypeError, match="summary_op tags must be non-empty str"):
        SummarySaverHook(save_steps=1, summary_op={1: torch.ones(())})


def test_summary_op_with_an_unfetchable_value_names_its_position():
    with pytest.raises(TypeError, match=r"summary_op\['w'\]\[1\]"):
        SummarySaverHook(save_steps=1, summary_op={"w": [torch.ones(()), 3.0]})


class ScalarsOnlyWriter:
    def add_scalar(self, tag, value, step):
        pass

    def flush(self):
        pass


def test_summary_writer_without_the_methods_is_rejected():
    with pytest.raises(TypeError, match=r"got ScalarsOnlyWriter without add_histogram\(\)\.$"):
        SummarySaverHook(save_steps=1, summary_op={"x": "x"}, summary_writer=ScalarsOnlyWriter())
    StepCounterHook(summary_writer=ScalarsOnlyWriter())  # steps/sec needs only scalars


# -- SummarySaverHook: TF's cadence cases ---------------------------------------------------------


def test_save_steps_writes_at_the_first_run_then_every_n_steps(tmp_path):
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op={"my_summary": counter()})
    run_session([hook], 30)
    assert scalars(tmp_path) == {
        1: {"my_summary": 1.0}, 9: {"my_summary": 2.0}, 17: {"my_summary": 3.0},
        25: {"my_summary": 4.0},
    }


def test_multiple_summaries_are_written_at_the_same_steps(tmp_path):
    assign_add = counter()
    hook = SummarySaverHook(
        save_steps=8, output_dir=tmp_path,
        summary_op={"my_summary": assign_add, "my_summary2": lambda: assign_add.var * 2},
    )
    run_session([hook], 10)
    assert scalars(tmp_path) == {
        1: {"my_summary": 1.0, "my_summary2": 2.0},
        9: {"my_summary": 2.0, "my_summary2": 4.0},
    }


def test_save_secs_writes_once_every_step_when_every_run_takes_that_long(tmp_path, clock):
    hook = SummarySaverHook(save_secs=0.5, output_dir=tmp_path,
                            summary_op={"my_summary": counter()})
    run_session([hook], 4, clock, secs_per_run=0.5)
    assert scalars(tmp_path) == {s: {"my_summary": float(s)} for s in (1, 2, 3, 4)}


def test_save_secs_writes_once_every_three_steps(tmp_path, clock):
    hook = SummarySaverHook(save_secs=9.0, output_dir=tmp_path,
                            summary_op={"my_summary": counter()})
    run_session([hook], 8, clock, secs_per_run=3.1)
    # 24.8 seconds pass (3.1 * 8); it writes every 9 seconds starting from the first run
    assert scalars(tmp_path) == {1: {"my_summary": 1.0}, 4: {"my_summary": 2.0},
                                 7: {"my_summary": 3.0}}


def test_summary_op_is_evaluated_only_on_the_runs_that_write():
    calls: List[int] = []
    hook = SummarySaverHook(save_steps=4, summary_op={"x": lambda: calls.append(1) or 1.0})
    run_session([hook], 10)
    assert len(calls) == 3  # runs 1, 5 and 9


def test_the_first_run_of_every_session_writes(tmp_path):
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op={"my_summary": counter()})
    first = run_session([hook], 3)
    run_session([hook], 2, state=first.state_dict())  # resumes at global step 3
    assert sorted(scalars(tmp_path)) == [1, 4]


# -- SummarySaverHook: what is written where ------------------------------------------------------


def test_values_with_more_than_one_element_are_written_as_histograms(tmp_path):
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    hook = SummarySaverHook(save_steps=2, output_dir=tmp_path,
                            summary_op={"w": weight, "one": torch.tensor([7.0])})
    run_session([hook], 3)
    acc = events(tmp_path)
    assert acc.Tags()["histograms"] == ["w"]
    assert acc.Tags()["scalars"] == ["one"]
    histograms = acc.Histograms("w")
    assert [h.step for h in histograms] == [1, 3]
    assert (histograms[0].histogram_value.min, histograms[0].histogram_value.max) == (-2.0, 4.0)
    assert histograms[0].histogram_value.num == 4


def test_a_dict_valued_summary_is_written_under_tag_slash_key(tmp_path):
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path,
                            summary_op={"stats": lambda: {"mean": torch.tensor(2.0), "n": 3}})
    run_session([hook], 1)
    assert scalars(tmp_path) == {1: {"stats/mean": 2.0, "stats/n": 3.0}}


def test_names_resolve_from_the_step_returned_dict(tmp_path):
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op={"loss": "loss"})
    with MonitoredSession([hook]) as sess:
        for i in range(2):
            sess.run(lambda i=i: {"loss": torch.tensor(10.0 + i)})
    assert scalars(tmp_path) == {1: {"loss": 10.0}, 2: {"loss": 11.0}}


def test_a_given_summary_writer_is_used_and_flushed_at_end(tmp_path):
    writer = SummaryWriter(str(tmp_path / "mine"), flush_secs=10_000)
    hook = SummarySaverHook(save_steps=1, summary_writer=writer, summary_op={"x": counter()})
    run_session([hook], 2)
    assert scalars(tmp_path / "mine") == {1: {"x": 1.0}, 2: {"x": 2.0}}
    writer.close()


def test_without_writer_or_output_dir_nothing_is_written_but_the_schedule_holds(tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    assign_add = counter()
    hook = SummarySaverHook(save_steps=8, summary_op={"x": assign_add})
    run_session([hook], 30)
    assert os.listdir(tmp_path) == []
    assert assign_add.var.item() == 4.0  # evaluated at steps 1, 9, 17, 25 only


def test_scalars_also_go_to_the_session_loggers_on_the_runs_that_write():
    session = PlainSession()
    hook = SummarySaverHook(save_steps=2, summary_op={"x": counter(), "w": torch.ones(3)})
    drive([hook], session, 4)
    assert session.logged == [(1, {"x": 1.0}), (3, {"x": 2.0})]  # histograms are not logged


def test_only_the_chief_writes_summaries(tmp_path):
    assign_add = counter()
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op={"x": assign_add})
    session = PlainSession(is_chief=False)
    drive([hook], session, 3)
    assert os.listdir(tmp_path) == [] and session.logged == []
    assert assign_add.var.item() == 3.0  # every process still evaluates (collective metrics)


def test_hooks_writing_to_one_output_dir_share_one_events_file(tmp_path):
    a = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op={"a": counter()})
    b = SummarySaverHook(save_steps=1, output_dir=str(tmp_path), summary_op={"b": counter(10)})
    run_session([a, b], 2)
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1
    assert scalars(tmp_path) == {1: {"a": 1.0, "b": 11.0}, 2: {"a": 2.0, "b": 12.0}}


def test_missing_tensorboard_raises_an_import_error_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op={"x": counter()})
    with pytest.raises(ImportError, match="this environment lacks: pip install tensorboard"):
        MonitoredSession([hook])
    counter_hook = StepCounterHook(output_dir=tmp_path)
    with pytest.raises(ImportError, match="needs the tensorboard package"):
        MonitoredSession([counter_hook])


def test_missing_tensorboard_does_not_matter_without_an_output_dir(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    session = PlainSession()
    drive([SummarySaverHook(save_steps=1, summary_op={"x": counter()})], session, 1)
    assert session.logged == [(1, {"x": 1.0})]


def test_importing_the_hooks_does_not_import_tensorboard():
    code = ("import sys, lightning_finalops.hooks.summary, lightning_finalops.hooks.profiler; "
            "print('tensorboard' in sys.modules, 'torch.utils.tensorboard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- SummarySaverHook under Lightning -------------------------------------------------------------


class FetchEveryRun(SessionRunHook):
    """Records ``(global_step, values on the host)`` of ``fetches`` after every run."""

    def __init__(self, fetches: Any) -> None:
        self.fetches, self.values = fetches, []

    def before_run(self, run_context):
        return SessionRunArgs(self.fetches)

    def after_run(self, run_context, run_values):
        self.values.append((run_context.session.global_step, to_host(run_values.results)))


def test_summary_saver_in_fit_writes_scalars_and_histograms_at_its_steps(tmp_path):
    model = make_module_class()()
    fetches = {"loss": "loss", "w": lambda: model.layer.weight}
    hook = SummarySaverHook(save_steps=2, output_dir=tmp_path, summary_op=fetches)
    recorder = FetchEveryRun(fetches)
    trainer = make_trainer(max_epochs=2, limit_val_batches=0,
                           callbacks=[HookCallback(training_hooks=[hook, recorder])])
    trainer.fit(model)
    expected = {step: values for step, values in recorder.values if step in (1, 3, 5, 7)}
    acc = events(tmp_path)
    assert [e.step for e in acc.Scalars("loss")] == [1, 3, 5, 7]
    for event in acc.Scalars("loss"):
        assert event.value == pytest.approx(expected[event.step]["loss"].item())
    histograms = acc.Histograms("w")
    assert [h.step for h in histograms] == [1, 3, 5, 7]
    for h in histograms:
        w = expected[h.step]["w"]
        assert h.histogram_value.num == 4
        assert h.histogram_value.min == pytest.approx(w.min().item())
        assert h.histogram_value.max == pytest.approx(w.max().item())


def test_summary_saver_in_fit_sends_scalars_to_the_trainer_loggers(tmp_path):
    pl = pl_package()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    hook = SummarySaverHook(save_steps=3, summary_op={"x_sum": "x_sum"})
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, logger=logger,
                           callbacks=[HookCallback(training_hooks=[hook])])
    trainer.fit(make_module_class()())
    (path,) = glob.glob(os.path.join(str(tmp_path), "run", "*", "metrics.csv"))
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("x_sum")]
    assert [int(row["step"]) for row in rows] == [1, 4, 7]


# -- StepCounterHook ------------------------------------------------------------------------------


def test_step_counter_needs_exactly_one_of_steps_and_secs():
    message = "^exactly one of every_n_steps and every_n_secs should be provided.$"
    with pytest.raises(ValueError, match=message):
        StepCounterHook(every_n_steps=None, every_n_secs=None)
    with pytest.raises(ValueError, match=message):
        StepCounterHook(every_n_secs=0.1)  # every_n_steps defaults to 100


def test_step_counter_every_n_steps_writes_at_11_and_21_without_warning(tmp_path, clock, caplog):
    hook = StepCounterHook(every_n_steps=10, output_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="lightning_finalops"):
        run_session([hook], 30, clock, secs_per_run=0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    written = scalars(tmp_path)
    assert sorted(written) == [11, 21]
    for step in (11, 21):
        assert list(written[step]) == ["global_step/sec"]
        assert written[step]["global_step/sec"] == pytest.approx(10 / 0.1, rel=1e-3)


def test_step_counter_every_n_secs_writes_at_2_and_3(tmp_path, clock):
    hook = StepCounterHook(every_n_steps=None, every_n_secs=0.1, output_dir=tmp_path)
    run_session([hook], 3, clock, secs_per_run=0.2)
    written = scalars(tmp_path)
    assert sorted(written) == [2, 3]
    for values in written.values():
        assert values["global_step/sec"] == pytest.approx(1 / 0.2)


def test_step_counter_logs_steps_per_sec_at_info(clock, caplog):
    hook = StepCounterHook(every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="lightning_finalops"):
        run_session([hook], 2, clock, secs_per_run=0.25)
    assert [r.getMessage() for r in caplog.records] == ["global_step/sec: 4"]


def test_step_counter_sends_steps_per_sec_to_the_session_loggers(clock):
    clock.tick = 0.5  # every timer update reads the clock once
    session = PlainSession()
    drive([StepCounterHook(every_n_steps=2)], session, 5)
    assert session.logged == [(3, {"global_step/sec": 4.0}), (5, {"global_step/sec": 4.0})]


def test_step_counter_writes_nothing_on_other_processes(tmp_path, clock):
    clock.tick = 0.5
    session = PlainSession(is_chief=False)
    drive([StepCounterHook(every_n_steps=1, output_dir=tmp_path)], session, 3)
    assert os.listdir(tmp_path) == [] and session.logged == []


def test_step_counter_warns_the_first_5_times_the_global_step_did_not_increase(clock, caplog):
    hook = StepCounterHook(every_n_steps=1, every_n_secs=None)
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        drive([hook], PlainSession(advance=0), 31)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert warnings[0].startswith(NOT_INCREASED)
    assert "Current value (could be stable): 0 vs previous value: 0." in warnings[0]


def test_each_session_measures_from_its_own_first_trigger(tmp_path, clock):
    hook = StepCounterHook(every_n_steps=1, output_dir=tmp_path)
    first = run_session([hook], 2, clock, secs_per_run=1.0)
    clock.now += 1000.0  # the time between two sessions is not a step time
    run_session([hook], 2, clock, secs_per_run=1.0, state=first.state_dict())
    assert scalars(tmp_path) == {2: {"global_step/sec": 1.0}, 4: {"global_step/sec": 1.0}}


def test_step_counter_in_fit_reaches_tensorboard_and_a_csv_logger(tmp_path, clock):
    clock.tick = 1.0  # one second between two triggers
    pl = pl_package()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    hook = StepCounterHook(every_n_steps=4, output_dir=tmp_path / "tb")
    trainer = make_trainer(max_epochs=3, limit_val_batches=0, logger=logger,
                           callbacks=[HookCallback(training_hooks=[hook])])
    trainer.fit(make_module_class()())
    (path,) = glob.glob(os.path.join(str(tmp_path), "run", "*", "metrics.csv"))
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("global_step/sec")]
    assert [(int(r["step"]), float(r["global_step/sec"])) for r in rows] == [(5, 4.0), (9, 4.0)]
    assert scalars(tmp_path / "tb") == {5: {"global_step/sec": 4.0}, 9: {"global_step/sec": 4.0}}


def test_step_counter_in_fit_warns_while_gradients_accumulate(caplog):
    hook = StepCounterHook(every_n_steps=100)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, accumulate_grad_batches=2,
                           callbacks=[HookCallback(training_hooks=[hook])])
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        trainer.fit(make_module_class()())
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_finalops"]
    assert len(warnings) == 1  # global steps after the 4 batches: 0, 1, 1, 2
    assert warnings[0].startswith(NOT_INCREASED)
    assert "accumulate_grad_batches" in warnings[0]
