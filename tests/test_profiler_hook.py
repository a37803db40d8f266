"""``ProfilerHook``: TF's ``basic_session_run_hooks_test.py`` cases, on ``torch.profiler``.

Time is controlled through ``lightning_finalops.hooks.timers.clock``; the traces are read back
with ``json.load``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest
import torch
from lightning_models import make_module_class, make_trainer

from lightning_finalops import (
    Engine,
    HookCallback,
    HookedSession,
    MonitoredSession,
    RunOptions,
    SessionRunArgs,
    SessionRunHook,
)
from lightning_finalops.hooks import timers
from lightning_finalops.hooks.profiler import ProfilerHook

MOCK_START_TIME = 1484695987.209386


@pytest.fixture
def clock(monkeypatch):
    now = [MOCK_START_TIME]
    monkeypatch.setattr(timers, "clock", lambda: now[0])
    return now


def timelines(output_dir) -> List[str]:
    return sorted(name for name in os.listdir(output_dir) if name.startswith("timeline-"))


def load_trace(path) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def matmul_step() -> torch.Tensor:
    return torch.randn(8, 8) @ torch.randn(8, 8)


# -- validation ----------------------------------------------------------------------------------


def test_raise_in_both_secs_and_steps():
    with pytest.raises(ValueError, match="^Can not provide both every_secs and every_steps.$"):
        ProfilerHook(save_secs=10, save_steps=20)


def test_raise_in_none_secs_and_steps():
    with pytest.raises(ValueError, match="^Either every_secs or every_steps should be provided.$"):
        ProfilerHook(save_secs=None, save_steps=None)


def test_output_dir_must_be_a_path():
    with pytest.raises(TypeError, match=r"output_dir must be a str or os.PathLike path, got int"):
        ProfilerHook(save_steps=1, output_dir=3)


# -- TF's cadence cases --------------------------------------------------------------------------


def test_save_secs_does_not_save_in_first_step(tmp_path):
    hook = ProfilerHook(save_secs=2, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(matmul_step)
        assert timelines(tmp_path) == []


def test_save_secs_saves_periodically(tmp_path, clock):
    hook = ProfilerHook(save_secs=2, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(matmul_step)  # not saved
        assert timelines(tmp_path) == []
        clock[0] = MOCK_START_TIME + 2.5
        sess.run(matmul_step)  # saved
        assert timelines(tmp_path) == ["timeline-2.json"]
        clock[0] = MOCK_START_TIME + 2.6
        sess.run(matmul_step)  # not saved
        clock[0] = MOCK_START_TIME + 4.4  # just before the next save is due
        sess.run(matmul_step)  # not saved
        assert timelines(tmp_path) == ["timeline-2.json"]
        clock[0] = MOCK_START_TIME + 4.5
        sess.run(matmul_step)  # saved
        assert timelines(tmp_path) == ["timeline-2.json", "timeline-5.json"]


def test_save_steps_does_not_save_in_first_step(tmp_path):
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(matmul_step)
        assert timelines(tmp_path) == []


def test_save_steps_saves_periodically(tmp_path):
    hook = ProfilerHook(save_steps=2, output_dir=tmp_path)
    counts = []
    with MonitoredSession([hook]) as sess:
        for _ in range(5):
            sess.run(matmul_step)
            counts.append(len(timelines(tmp_path)))
    assert counts == [0, 1, 1, 2, 2]
    assert timelines(tmp_path) == ["timeline-2.json", "timeline-4.json"]


def test_the_trace_of_step_2_is_written_as_timeline_2(tmp_path):
    # TF's test_run_metadata_saves: save_steps=1 traces the second run only, as "step_2".
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(matmul_step)
        sess.run(matmul_step)
    assert timelines(tmp_path) == ["timeline-2.json"]


def test_the_first_run_of_every_session_primes_the_timer(tmp_path):
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(matmul_step)
        sess.run(matmul_step)
        state = sess.state_dict()
    with MonitoredSession([hook], state=state) as sess:  # resumes at global step 2
        sess.run(matmul_step)  # first run of this session: not traced
        sess.run(matmul_step)
    assert timelines(tmp_path) == ["timeline-2.json", "timeline-4.json"]


# -- what is written -----------------------------------------------------------------------------


def test_the_timeline_is_a_chrome_trace_of_the_traced_run(tmp_path):
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: torch.ones(3) + 1)  # not traced
        sess.run(matmul_step)
    trace = load_trace(tmp_path / "timeline-2.json")
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::matmul" in names
    assert "aten::add" not in names  # the first run's op is not in the second run's trace


def test_show_dataflow_records_shapes_and_show_memory_records_allocations(tmp_path):
    def trace_with(**flags) -> Dict[str, Any]:
        out = tmp_path / str(sorted(flags.items()))
        with MonitoredSession([ProfilerHook(save_steps=1, output_dir=out, **flags)]) as sess:
            sess.run(matmul_step)
            sess.run(matmul_step)
        return load_trace(out / "timeline-2.json")

    def has_shapes(trace) -> bool:
        return any("Input Dims" in event.get("args", {}) for event in trace["traceEvents"])

    def has_memory(trace) -> bool:
        return any(event.get("name") == "[memory]" for event in trace["traceEvents"])

    default = trace_with()
    assert has_shapes(default) and not has_memory(default)
    plain = trace_with(show_dataflow=False)
    assert not has_shapes(plain) and not has_memory(plain)
    memory = trace_with(show_dataflow=False, show_memory=True)
    assert has_memory(memory)


def test_the_output_dir_is_created(tmp_path):
    out = tmp_path / "a" / "b"
    with MonitoredSession([ProfilerHook(save_steps=1, output_dir=str(out))]) as sess:
        sess.run(matmul_step)
        sess.run(matmul_step)
    assert timelines(out) == ["timeline-2.json"]


def test_the_default_output_dir_is_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MonitoredSession([ProfilerHook(save_steps=1)]) as sess:
        sess.run(matmul_step)
        sess.run(matmul_step)
    assert timelines(tmp_path) == ["timeline-2.json"]


def test_two_profiler_hooks_tracing_the_same_run_both_write_it(tmp_path):
    a = ProfilerHook(save_steps=1, output_dir=tmp_path / "a")
    b = ProfilerHook(save_steps=1, output_dir=tmp_path / "b")
    with MonitoredSession([a, b]) as sess:
        sess.run(matmul_step)
        sess.run(matmul_step)
    assert load_trace(tmp_path / "a" / "timeline-2.json") == load_trace(
        tmp_path / "b" / "timeline-2.json"
    )


def test_it_asks_for_a_full_trace_with_its_flags_only_when_due(tmp_path):
    requests = []

    class Spy(SessionRunHook):
        def after_run(self, run_context, run_values):
            requests.append(run_values.options)

    hook = ProfilerHook(save_steps=2, show_dataflow=False, show_memory=True, output_dir=tmp_path)
    session = ChiefSession(is_chief=True)
    hooked = HookedSession([hook, Spy()], session)
    hooked.begin()
    for _ in range(3):
        hooked.start_run()
        session.step += 1
        hooked.finish_run(None)
    assert [r.trace_level for r in requests] == [0, RunOptions.FULL_TRACE, 0]
    assert timelines(tmp_path) == ["timeline-2.json"]
    assert (requests[1].profile_memory, requests[1].record_shapes) == (True, False)


class ChiefSession(Engine):
    def __init__(self, is_chief: bool) -> None:
        self.step, self.chief = 0, is_chief

    @property
    def global_step(self) -> int:
        return self.step

    @property
    def is_chief(self) -> bool:
        return self.chief


def test_other_processes_neither_trace_nor_write(tmp_path):
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    session = ChiefSession(is_chief=False)
    hooked = HookedSession([hook], session)
    hooked.begin()
    hooked.create()
    traced = []
    for _ in range(3):
        pending = hooked.start_run()
        traced.append(pending.wants_trace)
        matmul_step()
        session.step += 1
        hooked.finish_run(None)
    assert traced == [False, False, False]
    assert timelines(tmp_path) == []


def test_a_missing_profile_is_reported_once_and_writes_nothing(tmp_path, caplog):
    hook = ProfilerHook(save_steps=1, output_dir=tmp_path)
    session = ChiefSession(is_chief=True)
    hooked = HookedSession([hook], session)
    hooked.begin()
    for _ in range(4):
        pending = hooked.start_run()
        pending.exit()  # an engine that drops the trace it was asked for
        if pending.wants_trace:  # (a run without one has no profile, read-only)
            pending.run_metadata.profile = None
        session.step += 1
        hooked.finish_run(None)
    assert timelines(tmp_path) == []
    assert [r.getMessage() for r in caplog.records].count(
        "ProfilerHook asked for a trace of global step 2, but the engine delivered no profile "
        "in run_metadata.profile; nothing written."
    ) == 1


# -- under Lightning -----------------------------------------------------------------------------


def test_profiler_hook_in_fit_writes_a_timeline_every_save_steps(tmp_path):
    traced: List[Any] = []

    class Seen(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs(None)

        def after_run(self, run_context, run_values):
            traced.append(run_values.run_metadata.profile is not None)

    hook = ProfilerHook(save_steps=2, output_dir=tmp_path)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback(training_hooks=[hook, Seen()])])
    trainer.fit(make_module_class()())
    assert traced == [False, True, False, True]
    assert timelines(tmp_path) == ["timeline-2.json", "timeline-4.json"]
    for name in timelines(tmp_path):
        names = {e.get("name") for e in load_trace(tmp_path / name)["traceEvents"]}
        assert "aten::addmm" in names or "aten::linear" in names
