"""``MonitoredSession`` against TF's ``_HookedSession``/``MonitoredSession`` rules.

Ports the hook cases of TF's ``monitored_session_test.py`` and the semantics of
``reference/tf_semantics.md`` §2-§4 (the ``[T:x]`` tags name the traced TF scenario).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import List

import pytest
import torch

from lightning_finalops import (
    CheckpointSaverHook,
    Coordinator,
    MonitoredSession,
    RawSession,
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunHook,
    StopAtStepHook,
    latest_checkpoint,
)


class Recorder(SessionRunHook):
    """Appends ``(name, method)`` to a shared log and records what it was handed.

    Args:
        name: its name in the log.
        log: the shared call log.
        args: what ``before_run`` returns: a ``SessionRunArgs``/``None``/anything, or a
            function of the run context returning it.
        stop_in: methods (``"before_run"``, ``"after_run"``) that call ``request_stop()``.
        raise_in: a method that raises ``exc`` after being logged.
        exc: the exception ``raise_in`` raises.
    """

    def __init__(self, name, log, *, args=None, stop_in=(), raise_in=None, exc=None):
        self.name = name
        self.log = log
        self.args = args
        self.stop_in = stop_in
        self.raise_in = raise_in
        self.exc = exc if exc is not None else ValueError(f"{name} failed")
        self.created_with = None
        self.contexts = []
        self.values = []
        self.end_sessions = []
        self.stop_seen = []  # (method, run_context.stop_requested on entry)
        self.steps = []  # (method, session.global_step)

    def _record(self, method):
        self.log.append((self.name, method))
        if self.raise_in == method:
            raise self.exc

    def begin(self):
        self._record("begin")

    def after_create_session(self, session, coord):
        self.created_with = (session, coord)
        self._record("after_create_session")

    def before_run(self, run_context):
        self.contexts.append(run_context)
        self.stop_seen.append(("before_run", run_context.stop_requested))
        self.steps.append(("before_run", run_context.session.global_step))
        self._record("before_run")
        if "before_run" in self.stop_in:
            run_context.request_stop()
        return self.args(run_context) if callable(self.args) else self.args

    def after_run(self, run_context, run_values):
        self.contexts.append(run_context)
        self.values.append(run_values)
        self.stop_seen.append(("after_run", run_context.stop_requested))
        self.steps.append(("after_run", run_context.session.global_step))
        self._record("after_run")
        if "after_run" in self.stop_in:
            run_context.request_stop()

    def end(self, session):
        self.end_sessions.append(session)
        self._record("end")


class CountingHook(SessionRunHook):
    """Counts its ``after_run`` calls and keeps the count as state."""

    def __init__(self, name=""):
        self.runs = 0
        self.name = name
        self.runs_at_create = None
        self.step_at_create = None

    @property
    def state_key(self):
        return f"CountingHook[{self.name}]" if self.name else "CountingHook"

    def after_create_session(self, session, coord):
        self.runs_at_create = self.runs
        self.step_at_create = session.global_step

    def after_run(self, run_context, run_values):
        self.runs += 1

    def state_dict(self):
        return {"runs": self.runs}

    def load_state_dict(self, state_dict):
        self.runs = state_dict["runs"]


def recorders(log, n=3, **kwargs):
    return [Recorder(f"h{i}", log, **kwargs) for i in range(1, n + 1)]


def calls(log, method):
    return [name for name, m in log if m == method]


def noop():
    return None


def raise_stop_iteration():
    raise StopIteration


def raising(exc):
    def step():
        raise exc

    return step


# -- call order ----------------------------------------------------------------------------------


def test_hooks_are_called_in_list_order_for_every_call_nothing_reversed():
    log = []
    hooks = recorders(log, 3)
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
        sess.run(noop)
    each = [("h1",), ("h2",), ("h3",)]

    def round_of(method):
        return [(name, method) for (name,) in each]

    expected = (
        round_of("begin")
        + round_of("after_create_session")
        + round_of("before_run") + round_of("after_run")
        + round_of("before_run") + round_of("after_run")
        + round_of("end")
    )
    assert log == expected


def test_constructor_calls_begin_then_after_create_session_and_nothing_else():
    log = []
    MonitoredSession(recorders(log, 2))
    assert log == [
        ("h1", "begin"), ("h2", "begin"),
        ("h1", "after_create_session"), ("h2", "after_create_session"),
    ]


def test_after_create_session_gets_the_raw_session_and_the_coordinator():
    log = []
    (hook,) = recorders(log, 1)
    sess = MonitoredSession([hook])
    session, coord = hook.created_with
    assert session is sess.raw_session()
    assert isinstance(session, RawSession)
    assert coord is sess.coordinator


def test_exception_in_after_create_session_propagates_and_skips_later_hooks():
    log = []
    hooks = [Recorder("h1", log, raise_in="after_create_session"), Recorder("h2", log)]
    with pytest.raises(ValueError, match="h1 failed"):
        MonitoredSession(hooks)
    assert log == [("h1", "begin"), ("h2", "begin"), ("h1", "after_create_session")]


def test_step_callable_runs_once_per_run_between_before_run_and_after_run():
    log = []
    hooks = recorders(log, 2)

    def step():
        log.append(("step", "run"))

    with MonitoredSession(hooks) as sess:
        sess.run(step)
    assert log[4:9] == [
        ("h1", "before_run"), ("h2", "before_run"), ("step", "run"),
        ("h1", "after_run"), ("h2", "after_run"),
    ]


def test_run_returns_the_users_evaluated_fetches():
    t = torch.tensor(2.0)
    with MonitoredSession() as sess:
        result = sess.run({"step": lambda: {"loss": t * 3}, "t": t, "none": None})
    assert result["step"]["loss"].item() == 6.0
    assert result["t"].item() == 2.0
    assert result["none"] is None


# -- run context ---------------------------------------------------------------------------------


def test_one_context_per_run_shared_by_every_hook():
    log = []
    hooks = recorders(log, 3)
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
        sess.run(noop)
    first, second = hooks[0].contexts[0], hooks[0].contexts[2]
    for hook in hooks:
        assert hook.contexts == [first, first, second, second]
        assert all(a is b for a, b in zip(hook.contexts, [first, first, second, second]))
    assert first is not second


def test_original_args_are_the_users_fetches_and_feed_dict_without_options():
    log = []
    (hook,) = recorders(log, 1)
    fetches = {"step": lambda scale: scale}
    feeds = {"scale": 2}
    with MonitoredSession([hook]) as sess:
        sess.run(fetches, feed_dict=feeds, options=RunOptions(record_shapes=True))
    args = hook.contexts[0].original_args
    assert args == SessionRunArgs(fetches, feeds)
    assert args.fetches is fetches
    assert args.feed_dict is feeds
    assert args.options is None


def test_original_args_without_feeds_is_session_run_args_of_the_fetches():
    log = []
    (hook,) = recorders(log, 1)
    with MonitoredSession([hook]) as sess:
        sess.run(noop)
    assert hook.contexts[0].original_args == SessionRunArgs(noop)


def test_run_context_session_is_the_raw_session_not_the_monitored_one():
    log = []
    (hook,) = recorders(log, 1)
    model = torch.nn.Linear(1, 1)
    with MonitoredSession([hook], modules=model) as sess:
        sess.run(noop)
        raw = sess.raw_session()
    assert hook.contexts[0].session is raw
    assert raw is not sess
    assert raw.modules is model
    assert isinstance(raw.global_step, int)


def test_running_the_raw_session_triggers_no_hooks():
    log = []
    hooks = recorders(log, 2)
    t = torch.tensor(4.0)
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
        before = list(log)
        result = sess.raw_session().run({"t": t, "step": lambda: t + 1})
        assert log == before
    assert result["t"].item() == 4.0 and result["step"].item() == 5.0


def test_raw_session_run_resolves_names_from_the_latest_runs_dict():
    with MonitoredSession() as sess:
        sess.run(lambda: {"loss": torch.tensor(1.5)})
        assert sess.raw_session().run("loss").item() == 1.5


def test_raw_session_run_applies_and_restores_feeds():
    x = torch.tensor(1.0)
    with MonitoredSession() as sess:
        result = sess.raw_session().run(lambda: x * 2, feed_dict={x: 10.0})
    assert result.item() == 20.0
    assert x.item() == 1.0


# -- run values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [None, SessionRunArgs(None)], ids=["None", "fetches=None"])
def test_results_are_none_for_a_hook_that_asks_nothing(request_):
    log = []
    (hook,) = recorders(log, 1, args=request_)
    with MonitoredSession([hook]) as sess:
        sess.run(noop)
    values = hook.values[0]
    assert values.results is None
    assert values.options == RunOptions()
    assert isinstance(values.run_metadata, RunMetadata)
    assert values.run_metadata.profile is None


def test_each_hook_gets_its_own_fetch_results_in_its_structure():
    log = []
    t = torch.tensor([1.0, 2.0])
    hooks = [
        Recorder("h1", log, args=SessionRunArgs(t)),
        Recorder("h2", log),
        Recorder("h3", log, args=SessionRunArgs({"x": [t, lambda: t.sum()], "n": None})),
    ]
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
    assert torch.equal(hooks[0].values[0].results, t)
    assert hooks[1].values[0].results is None
    results = hooks[2].values[0].results
    assert set(results) == {"x", "n"} and results["n"] is None
    assert torch.equal(results["x"][0], t) and results["x"][1].item() == 3.0


def test_every_hook_gets_the_same_options_and_run_metadata_objects():
    log = []
    hooks = recorders(log, 2)
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
    assert hooks[0].values[0].options is hooks[1].values[0].options
    assert hooks[0].values[0].run_metadata is hooks[1].values[0].run_metadata


def test_hook_fetches_are_evaluated_after_the_step():
    log = []
    w = torch.zeros(1)
    (hook,) = recorders(log, 1, args=SessionRunArgs({"w": w, "w_fn": lambda: w.clone()}))

    def step():
        w.add_(1)

    with MonitoredSession([hook]) as sess:
        sess.run(step)
        sess.run(step)
    assert [v.results["w"].item() for v in hook.values] == [1.0, 2.0]
    assert [v.results["w_fn"].item() for v in hook.values] == [1.0, 2.0]


def test_hook_fetch_names_resolve_from_the_steps_returned_dict():
    log = []
    (hook,) = recorders(log, 1, args=SessionRunArgs({"loss": "loss", "both": ["acc", "loss"]}))
    losses = iter([torch.tensor(0.5), torch.tensor(0.25)])

    def step():
        return {"loss": next(losses), "acc": torch.tensor(0.9)}

    with MonitoredSession([hook]) as sess:
        sess.run(step)
        sess.run(step)
    assert [v.results["loss"].item() for v in hook.values] == [0.5, 0.25]
    assert [x.item() for x in hook.values[1].results["both"]] == pytest.approx([0.9, 0.25])


def test_unknown_hook_fetch_name_raises_key_error_and_skips_after_run():
    log = []
    (hook,) = recorders(log, 1, args=SessionRunArgs("los"))
    sess = MonitoredSession([hook])
    with pytest.raises(KeyError, match=r"'los'.*\['loss'\]"):
        sess.run(lambda: {"loss": torch.tensor(1.0)})
    assert calls(log, "after_run") == []


def test_invalid_hook_fetch_raises_type_error_naming_the_hook_and_position():
    log = []
    (hook,) = recorders(log, 1, args=SessionRunArgs({"a": [3]}))
    sess = MonitoredSession([hook])
    with pytest.raises(TypeError, match=r"Recorder\.before_run fetches\['a'\]\[0\]"):
        sess.run(noop)


def test_global_step_excludes_the_run_in_before_run_and_includes_it_in_after_run():
    log = []
    (hook,) = recorders(log, 1)
    with MonitoredSession([hook]) as sess:
        assert sess.global_step == 0
        sess.run(noop)
        sess.run(noop)
        assert sess.global_step == 2
    assert hook.steps == [
        ("before_run", 0), ("after_run", 1), ("before_run", 1), ("after_run", 2),
    ]


def test_a_failed_run_does_not_advance_the_global_step():
    sess = MonitoredSession()
    sess.run(noop)
    with pytest.raises(ValueError):
        sess.run(raising(ValueError("bad step")))
    assert sess.global_step == 1


# -- request_stop --------------------------------------------------------------------------------


@pytest.mark.parametrize("stopper", [0, 1], ids=["first-hook-stops", "second-hook-stops"])
def test_request_stop_in_after_run_lets_every_after_run_fire(stopper):
    log = []
    hooks = recorders(log, 2)
    hooks[stopper].stop_in = ("after_run",)
    sess = MonitoredSession(hooks)
    assert sess.run(lambda: 42) == 42
    assert calls(log, "after_run") == ["h1", "h2"]
    assert sess.should_stop() is True


def test_request_stop_in_after_run_is_seen_by_later_hooks():
    log = []
    hooks = recorders(log, 3)
    hooks[0].stop_in = ("after_run",)
    MonitoredSession(hooks).run(noop)
    assert [h.stop_seen[-1] for h in hooks] == [
        ("after_run", False), ("after_run", True), ("after_run", True),
    ]


def test_request_stop_in_before_run_still_runs_the_step_and_every_after_run():
    log = []
    hooks = recorders(log, 3)
    hooks[1].stop_in = ("before_run",)
    ran = []
    sess = MonitoredSession(hooks)
    assert sess.run(lambda: ran.append(1) or "done") == "done"
    assert ran == [1]
    assert calls(log, "after_run") == ["h1", "h2", "h3"]
    assert [h.stop_seen[0] for h in hooks] == [
        ("before_run", False), ("before_run", False), ("before_run", True),
    ]
    assert all(h.stop_seen[1] == ("after_run", True) for h in hooks)
    assert sess.should_stop() is True


def test_should_stop_is_false_until_a_run_requested_a_stop():
    log = []
    (hook,) = recorders(log, 1)
    sess = MonitoredSession([hook])
    sess.run(noop)
    assert sess.should_stop() is False
    hook.stop_in = ("after_run",)
    sess.run(noop)
    assert sess.should_stop() is True


def test_run_after_a_stop_request_raises_before_any_before_run():
    log = []
    hooks = recorders(log, 2)
    hooks[0].stop_in = ("after_run",)
    sess = MonitoredSession(hooks)
    sess.run(noop)
    n = len(log)
    ran = []
    with pytest.raises(RuntimeError, match=r"^Run called even after should_stop requested\.$"):
        sess.run(lambda: ran.append(1))
    assert log[n:] == []
    assert ran == []


def test_a_stop_request_does_not_call_end_until_the_session_closes():
    log = []
    hooks = recorders(log, 2)
    hooks[0].stop_in = ("after_run",)
    with MonitoredSession(hooks) as sess:
        while not sess.should_stop():
            sess.run(noop)
        assert calls(log, "end") == []
    assert calls(log, "end") == ["h1", "h2"]
    assert calls(log, "before_run") == ["h1", "h2"]


def test_loop_runs_until_the_run_that_requested_the_stop():
    log = []

    class StopAtThree(SessionRunHook):
        def after_run(self, run_context, run_values):
            if run_context.session.global_step >= 3:
                run_context.request_stop()

    (hook,) = recorders(log, 1)
    with MonitoredSession([StopAtThree(), hook]) as sess:
        while not sess.should_stop():
            sess.run(noop)
    assert sess.global_step == 3
    assert calls(log, "after_run") == ["h1"] * 3


# -- end of data and exceptions ------------------------------------------------------------------


def test_stop_iteration_from_the_step_inside_with_ends_the_session_cleanly():
    log = []
    hooks = recorders(log, 2)
    data = iter([1, 2])
    with MonitoredSession(hooks) as sess:
        while not sess.should_stop():
            sess.run(lambda: next(data))
    assert calls(log, "before_run") == ["h1", "h2"] * 3
    assert calls(log, "after_run") == ["h1", "h2"] * 2  # none for the exhausted run
    assert calls(log, "end") == ["h1", "h2"]
    assert hooks[0].end_sessions == [sess.raw_session()]
    assert sess.should_stop() is True


def test_stop_iteration_from_a_step_inside_a_list_fetch_ends_the_session_cleanly():
    log = []
    data = iter([1])
    with MonitoredSession(recorders(log, 1)) as sess:
        while not sess.should_stop():
            sess.run([lambda: next(data)])
    assert calls(log, "end") == ["h1"]


def test_stop_iteration_from_a_hooks_before_run_inside_with_ends_the_session_cleanly():
    log = []
    hooks = [Recorder("h1", log), Recorder("h2", log, raise_in="before_run", exc=StopIteration())]
    hooks.append(Recorder("h3", log))
    with MonitoredSession(hooks) as sess:
        sess.run(noop)
    assert calls(log, "before_run") == ["h1", "h2"]
    assert calls(log, "after_run") == []
    assert calls(log, "end") == ["h1", "h2", "h3"]


def test_stop_iteration_subclass_is_not_suppressed_and_skips_end():
    class EndOfEpoch(StopIteration):
        pass

    log = []
    with pytest.raises(EndOfEpoch):
        with MonitoredSession(recorders(log, 2)) as sess:
            sess.run(raising(EndOfEpoch()))
    assert calls(log, "end") == []
    assert sess.should_stop() is True


def test_stop_iteration_without_with_propagates_and_close_calls_end():
    log = []
    sess = MonitoredSession(recorders(log, 2))
    with pytest.raises(StopIteration):
        sess.run(raise_stop_iteration)
    assert calls(log, "end") == []
    assert sess.should_stop() is False
    sess.close()
    assert calls(log, "end") == ["h1", "h2"]
    assert sess.should_stop() is True


def test_other_exception_from_the_step_inside_with_skips_end_and_closes():
    log = []
    error = ValueError("Cannot feed value of shape (2, 2)")
    with pytest.raises(ValueError) as info:
        with MonitoredSession(recorders(log, 2)) as sess:
            sess.run(raising(error))
    assert info.value is error
    assert calls(log, "after_run") == []
    assert calls(log, "end") == []
    assert sess.should_stop() is True
    with pytest.raises(RuntimeError):
        sess.run(noop)


def test_exception_in_the_with_body_skips_end_and_closes():
    log = []
    with pytest.raises(KeyError):
        with MonitoredSession(recorders(log, 2)) as sess:
            sess.run(noop)
            raise KeyError("user code")
    assert calls(log, "after_run") == ["h1", "h2"]
    assert calls(log, "end") == []
    assert sess.should_stop() is True


def test_exception_in_before_run_skips_later_before_runs_the_step_and_after_runs():
    log = []
    hooks = [Recorder("h1", log), Recorder("h2", log, raise_in="before_run"), Recorder("h3", log)]
    ran = []
    sess = MonitoredSession(hooks)
    with pytest.raises(ValueError, match="h2 failed"):
        sess.run(lambda: ran.append(1))
    assert calls(log, "before_run") == ["h1", "h2"]
    assert ran == []
    assert calls(log, "after_run") == []


def test_exception_in_after_run_skips_later_hooks_after_run():
    log = []
    hooks = [Recorder("h1", log), Recorder("h2", log, raise_in="after_run"), Recorder("h3", log)]
    with pytest.raises(ValueError, match="h2 failed"):
        with MonitoredSession(hooks) as sess:
            sess.run(noop)
    assert calls(log, "after_run") == ["h1", "h2"]
    assert calls(log, "end") == []


def test_exception_in_end_skips_later_hooks_end_and_closes():
    log = []
    hooks = [Recorder("h1", log), Recorder("h2", log, raise_in="end"), Recorder("h3", log)]
    with pytest.raises(ValueError, match="h2 failed"):
        with MonitoredSession(hooks) as sess:
            sess.run(noop)
    assert calls(log, "end") == ["h1", "h2"]
    assert sess.should_stop() is True
    with pytest.raises(RuntimeError):
        sess.run(noop)


# -- close ---------------------------------------------------------------------------------------


def test_close_twice_calls_end_with_none_again_then_raises():
    log = []
    hooks = recorders(log, 2)
    sess = MonitoredSession(hooks)
    sess.close()
    with pytest.raises(RuntimeError, match=r"^Session is already closed\.$"):
        sess.close()
    assert calls(log, "end") == ["h1", "h2", "h1", "h2"]
    assert hooks[0].end_sessions == [sess.raw_session(), None]


def test_close_inside_with_makes_the_with_exit_raise():
    log = []
    with pytest.raises(RuntimeError, match="Session is already closed"):
        with MonitoredSession(recorders(log, 1)) as sess:
            sess.run(noop)
            sess.close()
    assert calls(log, "end") == ["h1", "h1"]


def test_should_stop_is_true_after_close():
    sess = MonitoredSession()
    sess.close()
    assert sess.should_stop() is True


def test_run_after_close_raises_runtime_error_without_calling_hooks():
    log = []
    sess = MonitoredSession(recorders(log, 1))
    sess.close()
    n = len(log)
    with pytest.raises(RuntimeError, match="closed"):
        sess.run(noop)
    assert log[n:] == []


def test_enter_returns_the_session_itself():
    sess = MonitoredSession()
    with sess as entered:
        assert entered is sess


# -- coordinator ---------------------------------------------------------------------------------


def test_coordinator_stop_from_a_thread_makes_should_stop_true_but_does_not_block_run():
    log = []
    (hook,) = recorders(log, 1)
    sess = MonitoredSession([hook])
    _, coord = hook.created_with
    thread = threading.Thread(target=coord.request_stop)
    thread.start()
    thread.join()
    assert sess.should_stop() is True
    assert sess.run(lambda: 1) == 1  # TF: coordinator stops surface in should_stop() only
    sess.close()


def test_coordinator_exception_is_reraised_by_close_after_every_end():
    log = []
    hooks = recorders(log, 2)
    sess = MonitoredSession(hooks)
    error = OSError("reader thread failed")
    thread = threading.Thread(target=hooks[0].created_with[1].request_stop, args=(error,))
    thread.start()
    thread.join()
    assert sess.should_stop() is True
    with pytest.raises(OSError) as info:
        sess.close()
    assert info.value is error
    assert calls(log, "end") == ["h1", "h2"]


def test_coordinator_exception_escapes_the_with_block_after_every_end():
    log = []
    error = OSError("reader thread failed")
    with pytest.raises(OSError) as info:
        with MonitoredSession(recorders(log, 2)) as sess:
            while not sess.should_stop():
                sess.run(noop)
                if sess.global_step == 2:
                    thread = threading.Thread(target=sess.coordinator.request_stop, args=(error,))
                    thread.start()
                    thread.join()
    assert info.value is error
    assert calls(log, "after_run") == ["h1", "h2"] * 2
    assert calls(log, "end") == ["h1", "h2"]


def test_close_joins_registered_threads_and_raises_what_one_records_while_stopping():
    error = OSError("the reader failed while draining")

    def reader(coord):
        coord.wait_for_stop()
        time.sleep(0.05)  # still draining when close() starts waiting
        coord.request_stop(error)

    sess = MonitoredSession()
    thread = threading.Thread(target=reader, args=(sess.coordinator,))
    sess.coordinator.register_thread(thread)
    thread.start()
    sess.run(noop)
    with pytest.raises(OSError) as info:
        sess.close()
    assert info.value is error
    assert not thread.is_alive()


def test_a_thread_that_does_not_stop_in_the_grace_period_is_named():
    coord = Coordinator()
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="stuck-reader")
    coord.register_thread(thread)
    thread.start()
    coord.request_stop()
    with pytest.raises(RuntimeError, match=r"still running after 0.1 s: \['stuck-reader'\]"):
        coord.join(stop_grace_period_secs=0.1)
    release.set()
    thread.join()


# -- feeds ---------------------------------------------------------------------------------------


def feeder(name, log, feeds):
    return Recorder(name, log, args=SessionRunArgs(None, feeds))


def test_hook_tensor_feed_overrides_the_tensor_during_the_step_and_is_restored():
    log = []
    x = torch.tensor([1.0, 2.0])
    sess = MonitoredSession([feeder("h1", log, {x: [5.0, 6.0]})])
    seen = sess.run(lambda: x.clone())
    assert seen.tolist() == [5.0, 6.0]
    assert x.tolist() == [1.0, 2.0]


def test_hook_fetch_of_a_fed_tensor_sees_the_fed_value():
    log = []
    x = torch.tensor(1.0)
    hooks = [feeder("h1", log, {x: 7.0}), Recorder("h2", log, args=SessionRunArgs(x))]
    MonitoredSession(hooks).run(noop)
    assert hooks[1].values[0].results.item() == 7.0
    assert x.item() == 1.0


def test_feeds_of_several_hooks_are_all_applied():
    log = []
    x, y = torch.tensor(1.0), torch.tensor(2.0)
    hooks = [feeder("h1", log, {x: 10.0}), feeder("h2", log, {y: 20.0, "scale": 3})]
    sess = MonitoredSession(hooks)
    result = sess.run(lambda scale: (x * scale, y * scale))
    assert (result[0].item(), result[1].item()) == (30.0, 60.0)
    assert (x.item(), y.item()) == (1.0, 2.0)


def test_a_run_whose_hook_fetch_fails_still_counts_as_its_step_ran():
    """The step changed the weights: the global step advances with them, run after run."""
    log = []
    w = torch.zeros(())
    hook = Recorder("h", log, args=SessionRunArgs("missing"))
    sess = MonitoredSession([hook])
    for expected in (1, 2):
        with pytest.raises(KeyError, match="missing"):
            sess.run(lambda: {"loss": w.add_(1.0)})
        assert sess.global_step == expected == int(w)
    assert ("h", "after_run") not in log  # the exception skips every after_run (TF's rule)
    assert float(sess.raw_session().run("loss")) == 2.0  # the step's outputs are named


def test_run_cannot_be_called_from_inside_a_step_of_the_same_session():
    with MonitoredSession([Recorder("h", [])]) as sess:
        with pytest.raises(RuntimeError, match="while a run is in flight"):
            sess.run(lambda: sess.run(noop))
        sess.run(noop)  # the failed run left the session usable
        assert sess.global_step == 1


def test_tensor_feed_is_restored_when_the_step_raises():
    log = []
    x = torch.tensor([1.0, 2.0])
    sess = MonitoredSession([feeder("h1", log, {x: [5.0, 6.0]})])

    def step():
        assert x.tolist() == [5.0, 6.0]
        raise ValueError("step failed")

    with pytest.raises(ValueError, match="step failed"):
        sess.run(step)
    assert x.tolist() == [1.0, 2.0]


def test_tensor_feed_is_restored_when_the_step_raises_stop_iteration():
    log = []
    x = torch.tensor(1.0)
    with MonitoredSession([feeder("h1", log, {x: 3.0})]) as sess:
        sess.run(raise_stop_iteration)
    assert x.item() == 1.0
    assert calls(log, "end") == ["h1"]  # still a clean end of data, not an error


def test_tensor_feed_of_the_wrong_shape_raises_value_error():
    log = []
    x = torch.zeros(3)
    sess = MonitoredSession([feeder("h1", log, {x: torch.zeros(2, 2)})])
    with pytest.raises(ValueError, match="shape"):
        sess.run(noop)
    assert calls(log, "after_run") == []


def test_user_and_hook_feeds_are_merged_and_the_users_dict_is_not_mutated():
    log = []
    x, y = torch.tensor(1.0), torch.tensor(2.0)
    user_feeds = {y: 20.0}
    sess = MonitoredSession([feeder("h1", log, {x: 10.0})])
    result = sess.run(lambda: {"x": x.clone(), "y": y.clone()}, feed_dict=user_feeds)
    assert (result["x"].item(), result["y"].item()) == (10.0, 20.0)
    assert list(user_feeds) == [y] and user_feeds[y] == 20.0
    assert (x.item(), y.item()) == (1.0, 2.0)


def test_two_hooks_feeding_one_tensor_raise_right_after_the_second_before_run():
    log = []
    x = torch.tensor(1.0)
    hooks = [feeder("h1", log, {x: 2.0}), feeder("h2", log, {x: 3.0}), Recorder("h3", log)]
    ran = []
    sess = MonitoredSession(hooks)
    with pytest.raises(RuntimeError, match=r"^Same tensor is fed by two hooks\. Conflict\(s\): \["):
        sess.run(lambda: ran.append(1))
    assert calls(log, "before_run") == ["h1", "h2"]
    assert ran == []
    assert calls(log, "after_run") == []
    assert x.item() == 1.0


def test_hook_and_user_feeding_one_tensor_raise_after_every_before_run():
    log = []
    x = torch.tensor(1.0)
    hooks = [feeder("h1", log, {x: 2.0}), Recorder("h2", log)]
    ran = []
    sess = MonitoredSession(hooks)
    with pytest.raises(
        RuntimeError, match=r"^Same tensor is fed by a SessionRunHook and user\. Conflict\(s\): \["
    ):
        sess.run(lambda: ran.append(1), feed_dict={x: 3.0})
    assert calls(log, "before_run") == ["h1", "h2"]
    assert ran == []
    assert calls(log, "after_run") == []


def test_hook_and_user_feeding_one_str_name_conflict():
    log = []
    sess = MonitoredSession([feeder("h1", log, {"scale": 2})])
    with pytest.raises(RuntimeError, match=r"SessionRunHook and user\. Conflict\(s\): \['scale'\]"):
        sess.run(lambda scale: scale, feed_dict={"scale": 3})


def test_feed_conflict_inside_with_skips_end():
    log = []
    x = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="Same tensor is fed by two hooks"):
        with MonitoredSession([feeder("h1", log, {x: 2.0}), feeder("h2", log, {x: 3.0})]) as s:
            s.run(noop)
    assert calls(log, "end") == []


def test_str_feeds_of_user_and_hooks_are_passed_to_the_step_callable():
    log = []
    sess = MonitoredSession([feeder("h1", log, {"offset": 1})])
    assert sess.run(lambda scale, offset: scale * 10 + offset, feed_dict={"scale": 2}) == 21


def test_str_feed_is_passed_to_a_hooks_fetch_callable_that_accepts_it():
    log = []
    hooks = [Recorder("h1", log, args=SessionRunArgs(lambda scale: scale * 2))]
    sess = MonitoredSession(hooks)
    sess.run(lambda: None, feed_dict={"scale": 4})
    assert hooks[0].values[0].results == 8


def test_str_feed_that_no_callable_accepts_raises_value_error_before_the_step():
    log = []
    ran = []
    sess = MonitoredSession([feeder("h1", log, {"scael": 2})])
    with pytest.raises(ValueError, match=r"\['scael'\].*no callable of this run accepts"):
        sess.run(lambda scale=1: ran.append(scale))
    assert ran == []
    assert calls(log, "after_run") == []


def test_bad_user_feed_key_raises_type_error():
    sess = MonitoredSession()
    with pytest.raises(TypeError, match="feed_dict keys"):
        sess.run(noop, feed_dict={1: 2.0})


# -- run options ---------------------------------------------------------------------------------


def test_run_options_are_merged_across_hooks_max_level_or_flags():
    log = []
    hooks = [
        Recorder("h1", log, args=SessionRunArgs(None, None, RunOptions(
            trace_level=RunOptions.HARDWARE_TRACE))),
        Recorder("h2", log, args=SessionRunArgs(None, None, RunOptions(
            trace_level=RunOptions.SOFTWARE_TRACE, profile_memory=True))),
        Recorder("h3", log),
    ]
    user = RunOptions(record_shapes=True)
    with MonitoredSession(hooks) as sess:
        sess.run(lambda: torch.ones(2) + 1, options=user)
    merged = hooks[0].values[0].options
    assert merged == RunOptions(
        trace_level=RunOptions.HARDWARE_TRACE, profile_memory=True, record_shapes=True
    )
    assert all(h.values[0].options is merged for h in hooks)
    assert user == RunOptions(record_shapes=True)  # the caller's object is not mutated
    assert merged is not user


def test_run_options_of_one_run_do_not_leak_into_the_next():
    log = []
    (hook,) = recorders(log, 1)
    with MonitoredSession([hook]) as sess:
        sess.run(noop, options=RunOptions(record_shapes=True))
        sess.run(noop)
    assert hook.values[1].options == RunOptions()


def test_invalid_user_options_raise_type_error():
    sess = MonitoredSession()
    with pytest.raises(TypeError, match="RunOptions"):
        sess.run(noop, options={"trace_level": 1})


def test_trace_request_gives_a_profile_that_exports_a_chrome_trace(tmp_path):
    log = []
    def trace_first_run(run_context):
        if run_context.session.global_step == 0:
            return SessionRunArgs(None, options=RunOptions(RunOptions.SOFTWARE_TRACE))
        return None

    tracer = Recorder("h1", log, args=trace_first_run)
    other = Recorder("h2", log)
    with MonitoredSession([tracer, other]) as sess:
        sess.run(lambda: torch.ones(8, 8) @ torch.ones(8, 8))
        sess.run(noop)
    profile = tracer.values[0].run_metadata.profile
    assert isinstance(profile, torch.profiler.profile)
    assert other.values[0].run_metadata.profile is profile
    path = tmp_path / "trace.json"
    profile.export_chrome_trace(str(path))
    with open(path) as f:
        trace = json.load(f)
    names = {event.get("name") for event in trace["traceEvents"]}
    assert any(name and name.startswith("aten::") for name in names)
    assert tracer.values[1].run_metadata.profile is None  # only the run that asked is traced


def test_user_trace_request_alone_also_traces_the_run():
    log = []
    (hook,) = recorders(log, 1)
    with MonitoredSession([hook]) as sess:
        sess.run(noop, options=RunOptions(trace_level=RunOptions.FULL_TRACE))
    assert isinstance(hook.values[0].run_metadata.profile, torch.profiler.profile)


# -- run_step_fn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("step_fn, names", [
    (lambda ctx: None, "('ctx',)"),
    (lambda: None, "()"),
    (lambda step_context, extra: None, "('step_context', 'extra')"),
])
def test_run_step_fn_rejects_other_argument_names_with_tfs_message(step_fn, names):
    sess = MonitoredSession()
    message = (
        "`step_fn` may either have one `step_context` argument, or `self` and `step_context` "
        f"arguments if it's an instance method. Got {names} instead."
    )
    with pytest.raises(ValueError) as info:
        sess.run_step_fn(step_fn)
    assert str(info.value) == message


def test_run_step_fn_accepts_a_method_and_returns_its_result():
    class Trainer:
        def step(self, step_context):
            return step_context.run_with_hooks(lambda: 7)

    with MonitoredSession() as sess:
        assert sess.run_step_fn(Trainer().step) == 7


def test_step_context_session_is_the_raw_session_and_fires_no_hooks():
    log = []
    t = torch.tensor(3.0)
    with MonitoredSession(recorders(log, 2)) as sess:
        n = len(log)

        def step_fn(step_context):
            assert step_context.session is sess.raw_session()
            return step_context.session.run(t)

        assert sess.run_step_fn(step_fn).item() == 3.0
        assert log[n:] == []
        assert sess.global_step == 0


def test_run_with_hooks_fires_the_hooks_for_each_call():
    log = []
    with MonitoredSession(recorders(log, 2)) as sess:

        def step_fn(step_context):
            first = step_context.run_with_hooks(lambda: "a")
            return [first, step_context.run_with_hooks(lambda: "b")]

        assert sess.run_step_fn(step_fn) == ["a", "b"]
        assert calls(log, "after_run") == ["h1", "h2"] * 2
        assert sess.global_step == 2


def test_step_context_request_stop_raises_stop_iteration_out_of_run_step_fn():
    log = []
    sess = MonitoredSession(recorders(log, 1))
    n = len(log)
    with pytest.raises(StopIteration, match="step_fn has requested the iterations to stop."):
        sess.run_step_fn(lambda step_context: step_context.request_stop())
    assert log[n:] == []
    assert sess.should_stop() is False


def test_step_context_request_stop_inside_with_ends_the_session_cleanly():
    log = []
    after = []
    with MonitoredSession(recorders(log, 2)) as sess:
        sess.run_step_fn(lambda step_context: step_context.run_with_hooks(noop))
        sess.run_step_fn(lambda step_context: step_context.request_stop())
        after.append("not reached")
    assert after == []
    assert calls(log, "after_run") == ["h1", "h2"]
    assert calls(log, "end") == ["h1", "h2"]
    assert sess.should_stop() is True


# -- state ---------------------------------------------------------------------------------------


def test_state_dict_holds_the_global_step_and_each_stateful_hooks_state():
    log = []
    with MonitoredSession([Recorder("h0", log), CountingHook(), Recorder("h1", log)]) as sess:
        for _ in range(3):
            sess.run(noop)
        state = sess.state_dict()
    # stateless hooks have no key: adding or moving one never changes the others' keys
    assert state == {"global_step": 3, "hooks": {"CountingHook": {"runs": 3}}}


def test_state_argument_is_restored_before_after_create_session():
    with MonitoredSession([CountingHook()]) as first:
        for _ in range(3):
            first.run(noop)
    hook = CountingHook()
    with MonitoredSession([hook], state=first.state_dict()) as sess:
        assert (hook.step_at_create, hook.runs_at_create) == (3, 3)
        assert sess.global_step == 3
        sess.run(noop)
    assert sess.global_step == 4
    assert hook.runs == 4


def test_state_is_not_yet_restored_in_begin():
    seen = []

    class BeginHook(CountingHook):
        def begin(self):
            seen.append(self.runs)

    hook = BeginHook()
    MonitoredSession([hook], state={"global_step": 5, "hooks": {hook.state_key: {"runs": 5}}})
    assert seen == [0]
    assert hook.runs == 5


def test_two_stateful_hooks_of_one_key_are_refused_and_named_ones_keep_their_state():
    with pytest.raises(ValueError, match=r"Two stateful hooks have the state key 'CountingHook'"):
        MonitoredSession([CountingHook(), CountingHook()])
    first, second = CountingHook(), CountingHook("b")
    sess = MonitoredSession([first, second])
    first.runs, second.runs = 1, 2
    assert sess.state_dict()["hooks"] == {"CountingHook": {"runs": 1},
                                          "CountingHook[b]": {"runs": 2}}
    a, b = CountingHook("b"), CountingHook()  # order changed: each finds its own by key
    MonitoredSession([a, b], state=sess.state_dict())
    assert (a.runs, b.runs) == (2, 1)


def test_load_state_dict_that_would_drop_saved_state_raises_value_error_when_strict():
    saved = MonitoredSession([CountingHook(), CountingHook("b")]).state_dict()
    sess = MonitoredSession([CountingHook()])
    with pytest.raises(ValueError, match=r"does not match.*\['CountingHook\[b\]'\] has no hook"):
        sess.load_state_dict(saved)


def test_a_stateful_hook_added_since_the_save_starts_fresh():
    first = MonitoredSession([CountingHook()])
    first.run(noop)
    old, added = CountingHook(), CountingHook("added")
    MonitoredSession([old, added], state=first.state_dict())
    assert (old.runs, added.runs) == (1, 0)


def test_load_state_dict_not_strict_loads_the_keys_both_have():
    saved = {"global_step": 4, "hooks": {"CountingHook": {"runs": 4}, "Gone": {}}}
    first, second = CountingHook(), CountingHook("b")
    sess = MonitoredSession([first, second])
    sess.load_state_dict(saved, strict=False)
    assert (first.runs, second.runs, sess.global_step) == (4, 0, 4)


def test_strict_load_ignores_stateless_hooks_added_or_removed():
    # a resume must not break because a logging hook was added or a saver hook removed
    saved = {"global_step": 4, "hooks": {"CountingHook": {"runs": 4}, "Gone": {}}}
    hook = CountingHook()
    sess = MonitoredSession([Recorder("new", []), hook])
    sess.load_state_dict(saved)
    assert (hook.runs, sess.global_step) == (4, 4)
    with pytest.raises(ValueError, match=r"saved state of \[.Lost.\] has no hook"):
        sess.load_state_dict({"global_step": 4, "hooks": {"Lost": {"runs": 1}}})


@pytest.mark.parametrize("bad", [{"hooks": {}}, {"global_step": -1, "hooks": {}}, []])
def test_load_state_dict_rejects_malformed_state(bad):
    with pytest.raises((TypeError, ValueError)):
        MonitoredSession().load_state_dict(bad)


# -- argument validation -------------------------------------------------------------------------


def test_hooks_item_that_is_not_a_hook_raises_type_error_naming_its_position():
    log = []
    with pytest.raises(TypeError, match=r"hooks\[1\] must be a SessionRunHook, got str"):
        MonitoredSession([Recorder("h1", log), "not a hook"])
    assert log == []  # nothing was called


def test_a_single_hook_instead_of_a_list_raises_type_error():
    with pytest.raises(TypeError, match="hooks must be a list of SessionRunHook"):
        MonitoredSession(Recorder("h1", []))


def test_before_run_returning_a_wrong_type_raises_type_error():
    log = []
    sess = MonitoredSession([Recorder("h1", log, args=("loss",))])
    with pytest.raises(TypeError, match=r"Recorder\.before_run must return a SessionRunArgs"):
        sess.run(noop)
    assert calls(log, "after_run") == []


def test_invalid_user_fetch_raises_type_error_naming_its_position():
    sess = MonitoredSession()
    with pytest.raises(TypeError, match=r"fetches\[1\]"):
        sess.run([noop, 3])


# -- the fast path of a step function ------------------------------------------------------------


class NameReader(SessionRunHook):
    """Reads the name ``"i"`` through the raw session in ``before_run`` and ``after_run``."""

    def __init__(self):
        self.read = []

    def before_run(self, run_context):
        self.read.append(run_context.session.run("i") if run_context.session.global_step else None)

    def after_run(self, run_context, run_values):
        self.read.append(run_context.session.run("i"))  # this run's: the fresh outputs


def _run_scenario(wrap, scenario):
    """Run ``scenario`` with its step passed as ``wrap(step)``; return what hooks and user saw."""
    log = []
    w = torch.ones(2, requires_grad=True)
    reader = NameReader()
    if scenario == "idle":
        hooks = []
    elif scenario == "no requests":
        hooks = [*recorders(log), reader]
    elif scenario == "a later hook asks":
        hooks = [Recorder("h1", log), Recorder("h2", log, args=SessionRunArgs({"l": "loss"})),
                 Recorder("h3", log)]
    elif scenario == "stop in after_run":
        hooks = recorders(log, stop_in=("after_run",))
    else:  # a failing step
        hooks = recorders(log)
    sess = MonitoredSession(hooks)
    outputs, errors = [], []
    for i in range(3):
        def step(i=i):
            if scenario == "a failing step" and i == 1:
                raise ValueError("step failed")
            return {"loss": (w * (i + 1)).sum(), "w": w, "i": i}

        try:
            outputs.append(sess.run(wrap(step)))
        except (ValueError, RuntimeError) as e:
            errors.append(str(e))
    def plain(value):  # tensors as comparable values
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            return (value.tolist(), value.requires_grad)
        return value

    seen = [
        (h.name, h.steps, h.stop_seen,
         [plain(v.results) for v in h.values], [type(v.run_metadata) for v in h.values],
         [c.original_args.feed_dict for c in h.contexts])
        for h in hooks if isinstance(h, Recorder)
    ]
    return (log, seen, reader.read, [plain(out) for out in outputs], errors, sess.global_step,
            sess.should_stop(), sess.raw_session().run("i") if outputs else None)


@pytest.mark.parametrize("scenario", ["idle", "no requests", "a later hook asks",
                                      "stop in after_run", "a failing step"])
def test_a_step_function_runs_as_any_other_callable_step(scenario):
    # a function takes HookedSession.run_step; a partial, the general start/finish path
    fast = _run_scenario(lambda step: step, scenario)
    general = _run_scenario(functools.partial, scenario)
    assert fast == general
    # the step's own result, handed back as it returned it (not copied or detached)
    assert all(out["loss"][1] and out["w"][1] for out in fast[3])
    if scenario == "no requests":
        assert fast[2] == [None, 0, 0, 1, 1, 2]


# -- preemption ---------------------------------------------------------------------------


@pytest.fixture
def sigterm_calls():
    """A Python SIGTERM handler of the test's (the previous one the session must call)."""
    calls: List[int] = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield calls, handler
    signal.signal(signal.SIGTERM, previous)


def _preempted_at_step_2(sess):
    def step():
        if sess.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread at once

    return step


def test_sigterm_stops_a_checkpointing_session_which_saves_then_calls_the_previous_handler(
    tmp_path, sigterm_calls
):
    calls, handler = sigterm_calls
    net = torch.nn.Linear(2, 1)
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=100)], modules=net) as sess:
        while not sess.should_stop():
            sess.run(_preempted_at_step_2(sess))
            assert calls == []  # the session's handler holds the signal while it is open
    assert sess.global_step == 3  # the run in flight completed, then the session stopped
    assert latest_checkpoint(str(tmp_path)).endswith("model.ckpt-3")  # end() saved it
    assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler


def test_sigterm_handling_is_off_with_one_argument_and_without_a_checkpoint(
    tmp_path, sigterm_calls
):
    calls, handler = sigterm_calls
    for hooks, kwargs in (([CheckpointSaverHook(tmp_path, save_steps=100)],
                           {"stop_on_sigterm": False}),
                          ([StopAtStepHook(last_step=5)], {})):
        with MonitoredSession(hooks, **kwargs) as sess:
            assert signal.getsignal(signal.SIGTERM) is handler  # nothing installed
            for _ in range(4):
                sess.run(_preempted_at_step_2(sess))
        assert sess.global_step == 4 and calls.pop() == signal.SIGTERM
    with pytest.raises(TypeError, match="stop_on_sigterm"):
        MonitoredSession(stop_on_sigterm="yes")


def test_a_second_sigterm_goes_to_the_previous_handler_at_once(tmp_path, sigterm_calls):
    calls, handler = sigterm_calls
    net = torch.nn.Linear(2, 1)
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=100)], modules=net) as sess:
        def twice():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the user insists: no more waiting

        sess.run(twice)
        assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
    assert calls == [signal.SIGTERM]  # passed on once, not again at the session's end
