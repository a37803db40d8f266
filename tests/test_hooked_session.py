"""The engine-neutral session core (``hooked_session.py``), driven through a small engine.

``StepEngine`` is a real implementation of the :class:`Engine` interface, as an adapter writes
one: its global step, named values and agreement are the test's. Every behaviour here holds
for both adapters, which only translate their engine's events into these calls.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, Dict, List, Mapping, Optional

import pytest
import torch
from conftest import Counter

from lightning_finalops import (
    AgreedValue,
    Agreement,
    FinalOpsHook,
    LoggingTensorHook,
    NanLossDuringTrainingError,
    NanTensorHook,
    RankFailedError,
    RunOptions,
    SessionRunArgs,
    SessionRunHook,
    StopAtStepHook,
    distributed,
    make_early_stopping_hook,
)
from lightning_finalops.distributed import FAILED, LEFT, RankAgreement, Vote
from lightning_finalops.engine import Engine
from lightning_finalops.hook_state import hook_state_dict
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.hooks import timers


class StepEngine(Engine):
    """An engine driven by hand: the test advances the step and names values."""

    def __init__(self, named: Optional[Dict[str, Any]] = None) -> None:
        self.step = 0
        self.named = named or {}
        self.named_reads = 0

    @property
    def global_step(self) -> int:
        return self.step

    def named_values(self) -> Mapping[str, Any]:
        self.named_reads += 1
        return self.named


class OtherRank(RankAgreement):
    """The core's side of an agreement with a second rank whose votes the test scripts.

    ``other_stops`` holds the runs (1-based) at which the other rank asks to stop;
    ``other_clock`` is rank 0's clock (the other rank plays rank 0); ``other_leaves`` maps
    a run to how the other rank leaves in its vote (``LEFT``, or ``FAILED`` with
    ``other_error``); ``other_values`` maps a run to what it posts to every declared
    value. The real
    agreement over two processes is tested in ``test_torchrun.py`` and
    ``test_failing_ranks.py``.
    """

    def __init__(self, other_stops=(), other_clock: float = 100.0, other_leaves=None,
                 other_error: str = "", other_values=None) -> None:
        self.other_stops, self.other_clock = set(other_stops), other_clock
        self.other_leaves = dict(other_leaves or {})
        self.other_error, self.other_values = other_error, dict(other_values or {})
        self.sent: List[bool] = []
        self.posted: List[tuple] = []
        self.left: Optional[tuple] = None  # (why, error) of this rank's departure
        self.failed: Optional[BaseException] = None  # a failure this rank sent in a vote
        self.done = False
        self.rank, self.name = 1, "the test session"
        self._last: Optional[Vote] = None

    def _vote(self, stop=False, departed=None, flags=0, values=()) -> Vote:
        failures = {r: self.other_error if r != self.rank else repr(self.failed)
                    for r, why in (departed or {}).items() if why == FAILED}
        return Vote(stop, self.other_clock, flags, False, dict(departed or {}), failures,
                    tuple(values))

    def start(self, step: int, now: float, finished: bool = False) -> Vote:
        return self._vote(flags=int(finished))

    def receive(self, step: int) -> Optional[Vote]:
        last, self._last = self._last, None
        if last is not None and last.departed:
            self.done = True
        return last

    def send(self, stop: bool, now: float, preempted: bool = False, values=(),
             failed: bool = False) -> None:
        self.sent.append(stop)
        self.posted.append(tuple(values))
        run = len(self.sent)
        self.other_clock += 10.0
        departed = {0: self.other_leaves[run]} if run in self.other_leaves else {}
        if failed:
            departed[self.rank] = FAILED
        self._last = self._vote(stop or run in self.other_stops, departed,
                                values=[v + self.other_values.get(run, 0.0) for v in values])

    def post_failure(self, error: BaseException) -> None:
        self.failed = error

    def leave(self, step: int, why: int, *, flag: bool = False, preempted: bool = False,
              error=None, grace=None) -> Optional[Vote]:
        if self.done:
            return None
        last = self.receive(step)
        if self.done:
            return last
        self.left, self.done = (why, error), True
        return self._vote(departed={self.rank: why}, flags=int(flag))

    def close(self) -> None:
        self.done = True


class AgreeingEngine(StepEngine):
    def __init__(self, agreement: OtherRank) -> None:
        super().__init__()
        self.agreement = agreement

    def rank_agreement(self, values, timeout, name):
        return self.agreement


class Recorder(SessionRunHook):
    """Records every call into a shared log; optionally asks for something in before_run."""

    def __init__(self, name: str, log: List[Any], args: Optional[SessionRunArgs] = None) -> None:
        self.name, self.log, self.args = name, log, args
        self.results: List[Any] = []

    def begin(self) -> None:
        self.log.append((self.name, "begin"))

    def after_create_session(self, session, coord) -> None:
        self.log.append((self.name, "after_create_session"))

    def before_run(self, run_context):
        self.log.append((self.name, "before_run"))
        return self.args

    def after_run(self, run_context, run_values) -> None:
        self.log.append((self.name, "after_run"))
        self.results.append(run_values.results)

    def end(self, session) -> None:
        self.log.append((self.name, "end"))


def one_run(session: HookedSession, outputs: Any = None, **start: Any) -> bool:
    session.start_run(**start)
    session.engine.step += 1  # type: ignore[attr-defined]
    return session.finish_run(outputs)


# -- order ---------------------------------------------------------------------------------------


def test_hooks_are_called_in_list_order_at_every_point():
    log: List[Any] = []
    session = HookedSession([Recorder("a", log), Recorder("b", log)], StepEngine())
    session.begin()
    session.create()
    one_run(session)
    session.end()
    assert log == [
        ("a", "begin"), ("b", "begin"),
        ("a", "after_create_session"), ("b", "after_create_session"),
        ("a", "before_run"), ("b", "before_run"),
        ("a", "after_run"), ("b", "after_run"),
        ("a", "end"), ("b", "end"),
    ]


def test_create_runs_once_and_end_creates_a_session_the_engine_never_created():
    log: List[Any] = []
    session = HookedSession([Recorder("a", log)], StepEngine())
    session.end()
    session.create()
    assert log == [("a", "after_create_session"), ("a", "end")]


def test_a_closed_session_ended_again_hands_the_hooks_none():
    seen = []

    class End(SessionRunHook):
        def end(self, session):
            seen.append(session)

    engine = StepEngine()
    session = HookedSession([End()], engine)
    session.end()
    session.end(closed=True)
    assert seen == [session.raw_session, None]


# -- requests ------------------------------------------------------------------------------------


def test_each_hook_gets_its_own_fetches_evaluated_against_the_step_outputs():
    log: List[Any] = []
    a = Recorder("a", log, SessionRunArgs({"x": "loss"}))
    b = Recorder("b", log)
    c = Recorder("c", log, SessionRunArgs(["loss", lambda: 7]))
    one_run(HookedSession([a, b, c], StepEngine()), {"loss": torch.tensor(2.0)})
    assert a.results == [{"x": torch.tensor(2.0)}]
    assert b.results == [None]
    assert c.results[0][0] == torch.tensor(2.0) and c.results[0][1] == 7


def test_options_merge_across_hooks_and_the_callers_options_are_kept():
    log: List[Any] = []
    hooks = [
        Recorder("a", log, SessionRunArgs(None, options=RunOptions(record_shapes=True))),
        Recorder("b", log, SessionRunArgs(None, options=RunOptions(trace_level=1))),
    ]
    seen = []

    class Spy(SessionRunHook):
        def after_run(self, run_context, run_values):
            seen.append(run_values.options)

    user = RunOptions(with_stack=True)
    one_run(HookedSession([*hooks, Spy()], StepEngine()), options=user)
    assert seen == [RunOptions(trace_level=1, record_shapes=True, with_stack=True)]
    assert user == RunOptions(with_stack=True)


def test_a_hook_returning_something_else_than_run_args_is_a_type_error():
    class Bad(SessionRunHook):
        def before_run(self, run_context):
            return {"fetches": "loss"}

    with pytest.raises(TypeError, match="Bad.before_run must return a SessionRunArgs or None"):
        HookedSession([Bad()], StepEngine()).start_run()


def test_a_run_cannot_start_while_another_is_in_flight_nor_finish_twice():
    session = HookedSession([Recorder("a", [])], StepEngine())
    session.start_run()
    with pytest.raises(RuntimeError, match="while a run is in flight"):
        session.start_run()
    session.finish_run(None)
    with pytest.raises(RuntimeError, match="without a run in flight"):
        session.finish_run(None)


def test_an_engine_that_skipped_a_batch_end_replaces_the_run_and_ignores_a_lone_end():
    """What Lightning needs: a batch whose end never came (replace=True aborts its run, its
    feeds restored, no after_run) and a batch end whose start never came (missing_ok)."""
    log: List[Any] = []
    w = torch.zeros(2)
    session = HookedSession([Feeder({w: [1.0, 1.0]}), Recorder("a", log)], StepEngine())
    session.start_run()
    assert w.tolist() == [1.0, 1.0]
    session.start_run(replace=True)  # the first run's batch end never came
    assert session.finish_run(None) is False
    assert w.tolist() == [0.0, 0.0]
    assert log.count(("a", "before_run")) == 2 and log.count(("a", "after_run")) == 1
    assert session.finish_run(None, missing_ok=True) is False  # an end without a start
    assert log.count(("a", "after_run")) == 1 and session.runs == 1


def test_replace_aborts_the_run_in_flight_even_when_a_stop_refuses_the_next():
    w = torch.zeros(2)
    session = HookedSession([Feeder({w: [1.0, 1.0]})], StepEngine())
    session.start_run()
    session.should_stop = True
    with pytest.raises(RuntimeError, match="should_stop"):
        session.start_run(replace=True)
    assert not session.in_run and w.tolist() == [0.0, 0.0]


def test_hooks_sharing_one_before_run_get_each_their_own_results():
    """A classmethod before_run is one equal bound method on every instance: each hook's
    request still goes to that hook, and every before_run is called once."""
    calls: List[str] = []

    class Asks(SessionRunHook):
        @classmethod
        def before_run(cls, run_context):
            calls.append("before_run")
            return SessionRunArgs("loss") if len(calls) % 2 == 0 else None

        def __init__(self) -> None:
            self.results: List[Any] = []

        def after_run(self, run_context, run_values):
            self.results.append(run_values.results)

    first, second = Asks(), Asks()
    session = HookedSession([first, second], StepEngine())
    one_run(session, {"loss": 1.0})
    assert calls == ["before_run"] * 2
    assert (first.results, second.results) == ([None], [1.0])


def test_an_engine_that_counts_its_own_steps_hears_of_every_counted_run():
    class Counting(StepEngine):
        def step_completed(self) -> None:
            self.step += 1

    engine = Counting()
    session = HookedSession([Recorder("a", [])], engine)
    session.start_run()
    session.finish_run(None)
    session.run_step(lambda: {})
    with pytest.raises(ZeroDivisionError):
        session.run_step(lambda: 1 / 0)  # a failed run is not counted
    assert engine.step == 2 and session.runs == 2


def test_a_run_without_a_trace_hands_every_hook_empty_read_only_metadata():
    seen: List[Any] = []

    class Peek(SessionRunHook):
        def after_run(self, run_context, run_values):
            seen.append(run_values.run_metadata)
            with pytest.raises(AttributeError, match="read-only; ask for a trace"):
                run_values.run_metadata.profile = "not a profile"

    session = HookedSession([Peek()], StepEngine())
    for _ in range(2):
        one_run(session)
    assert [m.profile for m in seen] == [None, None]
    # a hook may keep copies of its run values: the metadata copies and pickles as itself
    copied = pickle.loads(pickle.dumps(copy.deepcopy(seen[0])))
    assert copied is seen[0] and copied.profile is None


# -- the protected region ------------------------------------------------------------------------


class Feeder(SessionRunHook):
    def __init__(self, feeds: Dict[Any, Any]) -> None:
        self.feeds = feeds

    def before_run(self, run_context):
        return SessionRunArgs(None, feed_dict=self.feeds)


def test_tensor_feeds_hold_for_the_step_and_the_hook_fetches_and_are_restored_before_after_run():
    w = torch.zeros(3)
    seen = []

    class Reader(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs(lambda: w.clone())

        def after_run(self, run_context, run_values):
            seen.append(("fetched", run_values.results.tolist()))
            seen.append(("after_run", w.tolist()))

    session = HookedSession([Feeder({w: [1.0, 2.0, 3.0]}), Reader()], StepEngine())
    session.start_run()
    seen.append(("step", w.tolist()))
    session.finish_run(None)
    assert seen == [
        ("step", [1.0, 2.0, 3.0]),
        ("fetched", [1.0, 2.0, 3.0]),
        ("after_run", [0.0, 0.0, 0.0]),
    ]


def test_feeds_are_restored_when_the_step_raises():
    w = torch.zeros(2)
    session = HookedSession([Feeder({w: [5.0, 5.0]})], StepEngine())
    session.start_run()
    assert w.tolist() == [5.0, 5.0]
    session.abort_run()  # what an adapter calls when the step raised
    assert w.tolist() == [0.0, 0.0]
    assert not session.in_run


def test_feeds_are_restored_when_a_hook_fetch_raises():
    w = torch.zeros(2)

    class Failing(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs(lambda: 1 / 0)

    session = HookedSession([Feeder({w: [5.0, 5.0]}), Failing()], StepEngine())
    session.start_run()
    with pytest.raises(ZeroDivisionError):
        session.finish_run(None)
    assert w.tolist() == [0.0, 0.0]


def test_feeds_of_a_tensor_and_a_view_of_it_conflict_like_one_tensor_fed_twice():
    w = torch.zeros(3)
    session = HookedSession([Feeder({w: [1.0, 1.0, 1.0]}), Feeder({w[:2]: [2.0, 2.0]})],
                            StepEngine())
    with pytest.raises(RuntimeError, match=r"^Same tensor is fed by two hooks. Conflict"):
        session.start_run()
    user = HookedSession([Feeder({w[1:]: [2.0, 2.0]})], StepEngine())
    with pytest.raises(RuntimeError, match="fed by a SessionRunHook and user. Conflict"):
        user.start_run(feed_dict={w: [1.0, 1.0, 1.0]})
    with pytest.raises(RuntimeError, match=r"Same tensor is fed twice in feed_dict"):
        HookedSession([], StepEngine()).start_run(feed_dict={w: [1.0] * 3, w[:1]: [2.0]})
    assert w.tolist() == [0.0, 0.0, 0.0] and not session.in_run


def test_views_of_one_tensor_that_do_not_overlap_can_both_be_fed():
    w = torch.zeros(4)
    session = HookedSession([Feeder({w[:2]: [1.0, 1.0]}), Feeder({w[2:]: [2.0, 2.0]})],
                            StepEngine())
    session.start_run()
    assert w.tolist() == [1.0, 1.0, 2.0, 2.0]
    session.finish_run(None)
    assert w.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_a_feed_value_that_is_no_number_is_a_type_error_naming_the_feed():
    w = torch.zeros(2)
    with pytest.raises(TypeError, match=r"feed_dict: cannot feed str \('abc'\) to a tensor"):
        HookedSession([], StepEngine()).start_run(feed_dict={w: "abc"})


def test_the_same_hook_object_twice_in_one_list_is_a_value_error():
    hook = Recorder("a", [])
    with pytest.raises(ValueError, match=r"hooks\[2\] is the same Recorder object as hooks\[0\]"):
        HookedSession([hook, Recorder("b", []), hook], StepEngine())


def test_a_feed_of_the_wrong_shape_fails_before_any_tensor_is_touched():
    w, v = torch.zeros(2), torch.zeros(2)
    session = HookedSession([Feeder({w: [1.0, 1.0], v: [1.0, 1.0, 1.0]})], StepEngine())
    with pytest.raises(ValueError, match="shape"):
        session.start_run()
    assert w.tolist() == [0.0, 0.0] and not session.in_run


def test_the_trace_covers_the_step_and_the_hook_fetches():
    ops = []

    class Tracer(SessionRunHook):
        def before_run(self, run_context):
            fetch = lambda: torch.mm(torch.ones(2, 2), torch.ones(2, 2))  # noqa: E731
            return SessionRunArgs(fetch, options=RunOptions(trace_level=RunOptions.FULL_TRACE))

        def after_run(self, run_context, run_values):
            profile = run_values.run_metadata.profile
            ops.extend(event.key for event in profile.key_averages())

    session = HookedSession([Tracer()], StepEngine())
    session.start_run()
    torch.ones(3).cumsum(0)  # the step
    session.finish_run(None)
    assert "aten::cumsum" in ops and "aten::mm" in ops


# -- names ---------------------------------------------------------------------------------------


def test_names_resolve_to_the_fresh_step_outputs_then_the_named_values_then_older_outputs():
    engine = StepEngine(named={"loss": "named", "acc": "named acc"})
    seen: Dict[str, Any] = {}

    class Names(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs(["loss", "acc"])

        def after_run(self, run_context, run_values):
            seen["fetch"] = run_values.results
            seen["raw run in after_run"] = run_context.session.run("loss")

        def end(self, session):
            seen["raw run in end"] = session.run(["loss", "only_in_outputs"])

    session = HookedSession([Names()], engine)
    session.start_run()
    session.finish_run({"loss": "fresh", "only_in_outputs": 1})
    session.end()
    assert seen == {
        "fetch": ["fresh", "named acc"],
        "raw run in after_run": "fresh",
        "raw run in end": ["named", 1],
    }


def test_named_values_are_read_only_for_a_name_the_step_outputs_lack():
    engine = StepEngine(named={"acc": 1})
    one_run(HookedSession([Recorder("a", [], SessionRunArgs("loss"))], engine), {"loss": 0})
    assert engine.named_reads == 0
    one_run(HookedSession([Recorder("a", [], SessionRunArgs("acc"))], engine), {"loss": 0})
    assert engine.named_reads == 1


def test_an_unknown_name_lists_the_names_of_every_namespace():
    log: List[Any] = []
    session = HookedSession([Recorder("a", log, SessionRunArgs("nope"))],
                            StepEngine(named={"acc": 1}))
    session.start_run()
    with pytest.raises(KeyError, match=r"unknown fetch name 'nope'.*\['acc', 'loss'\]"):
        session.finish_run({"loss": 0})


# -- stop and exceptions -------------------------------------------------------------------------


def test_a_stop_lets_every_after_run_fire_then_refuses_the_next_run():
    log: List[Any] = []

    class Stopper(SessionRunHook):
        def after_run(self, run_context, run_values):
            run_context.request_stop()

    session = HookedSession([Stopper(), Recorder("b", log)], StepEngine())
    assert one_run(session) is True
    assert log[-1] == ("b", "after_run")
    with pytest.raises(RuntimeError, match="Run called even after should_stop requested."):
        session.start_run()


def test_an_exception_in_after_run_skips_the_later_hooks_and_the_stop():
    log: List[Any] = []

    class Failing(SessionRunHook):
        def after_run(self, run_context, run_values):
            run_context.request_stop()
            raise ValueError("boom")

    session = HookedSession([Failing(), Recorder("b", log)], StepEngine())
    session.start_run()
    with pytest.raises(ValueError, match="boom"):
        session.finish_run(None)
    assert ("b", "after_run") not in log
    assert session.should_stop is False and not session.in_run


def agreeing_session(hooks, agreement: OtherRank) -> HookedSession:
    session = HookedSession(hooks, AgreeingEngine(agreement), agree_across_ranks=True)
    session.begin()
    session.create()
    return session


class StopAt(SessionRunHook):
    def __init__(self, step: int, rank_consistent: bool = False) -> None:
        self.step, self.rank_consistent = step, rank_consistent

    def after_run(self, run_context, run_values):
        if run_context.session.global_step == self.step:
            run_context.request_stop(rank_consistent=self.rank_consistent)


def test_a_stop_requested_on_another_rank_stops_this_one_one_run_later():
    session = agreeing_session([Recorder("a", [])], OtherRank(other_stops={2}))
    assert [one_run(session) for _ in range(2)] == [False, False]
    assert one_run(session) is True  # the vote of run 2 is read at the end of run 3
    session.end()
    assert session.engine.agreement.left == (LEFT, None)  # it left with a message


def test_a_stop_requested_here_is_agreed_too_and_applies_one_run_later_on_every_rank():
    agreement = OtherRank()
    session = agreeing_session([StopAt(step=2)], agreement)
    assert [one_run(session) for _ in range(3)] == [False, False, True]
    assert agreement.sent == [False, True, False]


def test_a_rank_consistent_stop_applies_at_once_as_with_one_process():
    agreement = OtherRank()
    session = agreeing_session([StopAt(step=2, rank_consistent=True)], agreement)
    assert [one_run(session) for _ in range(2)] == [False, True]
    assert agreement.sent == [False, False]  # nothing to tell the others: they stop too


def test_hooks_of_every_rank_decide_on_rank_zeros_clock_as_agreed_one_run_behind(monkeypatch):
    monkeypatch.setattr(timers, "clock", lambda: 5.0)  # this rank's own clock
    seen = []

    class Clock(SessionRunHook):
        def after_create_session(self, session, coord):
            seen.append(("created", timers.now()))

        def after_run(self, run_context, run_values):
            seen.append((run_context.session.global_step, timers.now()))

    session = agreeing_session([Clock()], OtherRank(other_clock=100.0))
    for _ in range(3):
        one_run(session)
    session.end()
    # creation agrees at once; run k reads what run k-1 sent (the first run has nothing yet)
    assert seen == [("created", 100.0), (1, 100.0), (2, 110.0), (3, 120.0)]
    assert timers.now() == 5.0  # after the session: this process's clock again


def test_sessions_that_do_not_agree_or_cannot_stop_send_nothing():
    silent = OtherRank()
    session = HookedSession([Recorder("a", [])], AgreeingEngine(silent))  # an evaluation
    session.create()
    one_run(session)
    idle = OtherRank()
    session = agreeing_session([FinalOpsHook({"x": "loss"})], idle)  # no per-run method
    one_run(session, {"loss": 1})
    session.end()
    assert silent.sent == idle.sent == []


def test_an_abandoned_session_drops_its_vote_without_waiting():
    agreement = OtherRank()
    session = agreeing_session([Recorder("a", [])], agreement)
    one_run(session)
    session.abandon()
    assert agreement.left[0] == FAILED  # the others hear of it in its next vote
    assert distributed.agreed_time() is None


def test_an_exception_in_end_leaves_the_agreement_and_restores_the_clock():
    class Failing(SessionRunHook):
        def end(self, session):
            raise OSError("disk full")

    agreement = OtherRank()
    session = agreeing_session([Recorder("a", []), Failing()], agreement)
    one_run(session)
    with pytest.raises(OSError):
        session.end()
    assert agreement.left[0] == FAILED and isinstance(agreement.left[1], OSError)
    assert distributed.agreed_time() is None


def test_a_session_inside_another_restores_the_outer_sessions_agreed_time():
    outer = agreeing_session([Recorder("a", [])], OtherRank(other_clock=100.0))
    inner = agreeing_session([Recorder("b", [])], OtherRank(other_clock=500.0))
    assert timers.now() == 500.0
    inner.end()
    assert timers.now() == 100.0
    outer.end()
    assert distributed.agreed_time() is None


def test_an_idle_session_calls_no_hook_per_run_and_still_records_the_outputs():
    seen = []

    class AtEnd(SessionRunHook):
        def end(self, session):
            seen.append(session.run("loss"))

    session = HookedSession([AtEnd()], StepEngine())
    assert session.idle_per_run
    for loss in (1, 2):
        assert one_run(session, {"loss": loss}) is False
    session.end()
    assert seen == [2]


# -- state ---------------------------------------------------------------------------------------


def test_only_stateful_hooks_have_state_once_each():
    first, second = Counter(runs=1), Counter(runs=2, name="second")
    hooks = [Recorder("a", []), first, Recorder("b", []), second, first]
    session = HookedSession(hooks[:4], StepEngine())
    assert session.state_dict() == {"Counter": {"runs": 1}, "Counter[second]": {"runs": 2}}
    assert hook_state_dict(hooks) == session.state_dict()  # the same hook twice: one state


def test_two_stateful_hooks_with_one_key_are_refused_when_the_session_is_built():
    first, second = Counter(runs=1), Counter(runs=2)
    with pytest.raises(ValueError, match=r"Two stateful hooks have the state key 'Counter'"):
        HookedSession([first, Recorder("a", []), second], StepEngine())


def test_state_with_no_hook_to_go_to_is_an_error_unless_not_strict():
    session = HookedSession([Counter()], StepEngine())
    saved = {"Counter": {"runs": 3}, "Counter[other]": {"runs": 4}}
    with pytest.raises(ValueError, match=r"\['Counter\[other\]'\] has no hook here"):
        session.load_state_dict(saved)
    session.load_state_dict(saved, strict=False)
    assert session.hooks[0].runs == 3


def test_the_session_keeps_no_reference_to_a_finished_runs_fetches() -> None:
    """A step (and what its closure holds, such as a DDP module) is freed when the caller
    drops it, not kept by the session until its next run (it would outlive
    destroy_process_group() and abort at exit)."""
    import gc
    import weakref

    from lightning_finalops import MonitoredSession, SessionRunHook

    class AfterRun(SessionRunHook):
        def after_run(self, run_context, run_values):
            pass

    with MonitoredSession([AfterRun()]) as sess:
        def step():
            return torch.ones(())

        sess.run({"out": step})  # through start_run/finish_run, as under Lightning
        ref = weakref.ref(step)
        del step
        gc.collect()
        assert ref() is None


# -- session rules across ranks and on failure --------------------------------------------------


class FinishedElsewhere(OtherRank):
    """The other rank's hooks find the job finished (a chief-only hook restored stopped)."""

    def start(self, step: int, now: float, finished: bool = False) -> Vote:
        return self._vote(flags=1)


def test_a_job_another_rank_finds_finished_is_finished_on_every_rank():
    log: List[Any] = []
    session = agreeing_session([Recorder("a", log)], FinishedElsewhere())
    assert session.is_finished_job and session.coord.should_stop()
    assert log == [("a", "begin")]  # no after_create_session here either
    session.end()
    assert log == [("a", "begin")] and distributed.agreed_time() is None


def test_an_exception_in_after_create_session_leaves_the_agreement_and_restores_the_clock():
    class Failing(SessionRunHook):
        def after_create_session(self, session, coord):
            raise OSError("no disk")

    agreement = OtherRank()
    session = HookedSession([Recorder("a", []), Failing()], AgreeingEngine(agreement),
                            agree_across_ranks=True)
    with pytest.raises(OSError):
        session.create()
    assert agreement.left[0] == FAILED and distributed.agreed_time() is None


def test_a_hook_stopping_at_creation_still_gets_every_end_as_in_tf():
    log: List[Any] = []

    class StopNow(SessionRunHook):
        def after_create_session(self, session, coord):
            coord.request_stop()

    session = HookedSession([StopNow(), Recorder("a", log)], StepEngine())
    session.begin()
    session.create()
    assert session.coord.should_stop() and not session.is_finished_job
    session.end()
    assert log[-1] == ("a", "end")


class SavingEngine(StepEngine):
    def __init__(self) -> None:
        super().__init__()
        self.written: List[str] = []

    def write_checkpoint(self, path: str) -> None:
        self.written.append(path)


def test_checkpoints_asked_for_in_a_run_are_written_after_its_last_after_run_in_order():
    seen: List[Any] = []

    class Saver(SessionRunHook):
        def __init__(self, path):
            self.path = path

        def after_run(self, run_context, run_values):
            run_context.session.save_checkpoint(self.path, lambda: seen.append(self.path))

    class Last(SessionRunHook):
        def after_run(self, run_context, run_values):
            seen.append(("last", list(engine.written)))

    engine = SavingEngine()
    session = HookedSession([Saver("a"), Saver("b"), Saver("a"), Last()], engine)
    session.begin()
    session.create()
    one_run(session)
    assert seen == [("last", []), "a", "a", "b"]  # "a" asked twice: one write, both told
    assert engine.written == ["a", "b"]


# -- declared agreement, departures and failures -------------------------------------------------


class Declares(SessionRunHook):
    """Declares one summed value; posts 1 at the runs in ``post_at``; records what it read."""

    def __init__(self, post_at=()) -> None:
        self.value, self.post_at, self.read = AgreedValue(), set(post_at), []

    def agreement(self) -> Agreement:
        return Agreement(values=(self.value,))

    def after_run(self, run_context, run_values):
        self.read.append(self.value.agreed)
        if run_context.session.global_step in self.post_at:
            self.value.post(1.0)


class CountingEngine(AgreeingEngine):
    def __init__(self, agreement: OtherRank) -> None:
        super().__init__(agreement)
        self.asked = 0

    def rank_agreement(self, values, timeout, name):
        self.asked += 1
        return self.agreement


def test_a_session_whose_hooks_declare_nothing_never_asks_for_an_agreement():
    quiet = [StopAtStepHook(last_step=5), FinalOpsHook({"x": "loss"}),
             LoggingTensorHook({"x": "loss"}, every_n_iter=2)]
    engine = CountingEngine(OtherRank())
    session = HookedSession(quiet, engine, agree_across_ranks=True)
    session.begin()
    session.create()
    one_run(session, {"loss": 1.0})
    session.end()
    assert engine.asked == 0 and engine.agreement.sent == []
    # one hook that may stop on one rank (the default for per-run hooks) makes it vote
    engine = CountingEngine(OtherRank())
    session = HookedSession([*quiet[1:], Recorder("a", [])], engine, agree_across_ranks=True)
    session.begin()
    session.create()
    one_run(session, {"loss": 1.0})
    assert engine.asked == 1 and engine.agreement.sent == [False]


def test_declared_values_are_summed_over_ranks_and_read_one_run_later():
    hook = Declares(post_at={2})
    agreement = OtherRank(other_values={3: 5.0})
    session = agreeing_session([hook], agreement)
    for _ in range(4):
        one_run(session)
    # run 1 reads nothing yet; run 3 reads run 2's vote (1 here); run 4 reads 5 from the other
    assert hook.read == [None, 0.0, 1.0, 5.0]
    assert agreement.posted == [(0.0,), (1.0,), (0.0,), (0.0,)]  # a post lasts one vote


def test_a_rank_that_left_stops_this_one_at_the_run_that_reads_its_message(caplog):
    log: List[Any] = []
    agreement = OtherRank(other_leaves={2: LEFT})
    session = agreeing_session([Recorder("a", log)], agreement)
    with caplog.at_level("WARNING", logger="lightning_finalops"):
        assert [one_run(session) for _ in range(3)] == [False, False, True]
    assert "rank 0 ended its session" in caplog.text and "after global step 3" in caplog.text
    assert agreement.sent == [False, False]  # nothing is sent after such a vote
    session.end()
    assert ("a", "end") in log and agreement.left is None  # ends as on a stop, silently


def test_a_rank_that_failed_makes_this_one_raise_naming_it_and_its_exception():
    log: List[Any] = []
    agreement = OtherRank(other_leaves={2: FAILED}, other_error="ValueError: bad batch")
    session = agreeing_session([Recorder("a", log)], agreement)
    one_run(session)
    one_run(session)
    with pytest.raises(RankFailedError, match=r"rank 0 failed with ValueError: bad batch") as e:
        one_run(session)
    assert e.value.failures == {0: "ValueError: bad batch"} and e.value.global_step == 3
    assert [c for c in log if c[1] == "after_run"] == [("a", "after_run")] * 2
    session.abandon(e.value)  # what the adapters do: no end(), nothing more sent
    assert ("a", "end") not in log and agreement.left is None


def test_an_exception_on_this_rank_is_posted_to_the_others_before_it_propagates():
    class Failing(SessionRunHook):
        def after_run(self, run_context, run_values):
            raise KeyError("lost")

    agreement = OtherRank()
    session = agreeing_session([Failing()], agreement)
    with pytest.raises(KeyError):
        one_run(session)
    assert agreement.left[0] == FAILED and isinstance(agreement.left[1], KeyError)
    agreement = OtherRank()
    session = agreeing_session([Recorder("a", [])], agreement)

    def step():
        raise ZeroDivisionError("in the step")

    with pytest.raises(ZeroDivisionError):
        session.run_step(step)
    assert agreement.left[0] == FAILED and isinstance(agreement.left[1], ZeroDivisionError)


def test_an_early_stop_decided_on_another_rank_is_recorded_on_this_one():
    stopper = make_early_stopping_hook(lambda: False, run_every_secs=None, run_every_steps=1)
    agreement = OtherRank(other_stops={2}, other_values={2: 1.0})
    session = agreeing_session([stopper], agreement)
    assert [one_run(session) for _ in range(3)] == [False, False, True]
    # this rank's own function never decided: the other rank's decision is in the state
    assert stopper.stopped and stopper.state_dict() == {"stop": True}


def test_a_nan_on_another_rank_fails_every_rank_at_the_same_run():
    nan = NanTensorHook("loss")
    session = agreeing_session([nan], OtherRank(other_values={2: 1.0}))
    one_run(session, {"loss": torch.tensor(1.0)})
    one_run(session, {"loss": torch.tensor(1.0)})
    with pytest.raises(NanLossDuringTrainingError):
        one_run(session, {"loss": torch.tensor(1.0)})
    # and a NaN here is posted, not raised at once: every rank raises a run later
    agreement = OtherRank()
    session = agreeing_session([NanTensorHook("loss", fail_on_nan_loss=False)], agreement)
    assert one_run(session, {"loss": torch.tensor(float("nan"))}) is False
    assert agreement.posted == [(1.0,)]
    assert one_run(session, {"loss": torch.tensor(1.0)}) is True


def test_agreement_misuse_is_refused_where_it_is_made():
    class Wrong(SessionRunHook):
        def agreement(self):
            return True

    with pytest.raises(TypeError, match=r"Wrong.agreement\(\) must return an Agreement"):
        HookedSession([Wrong()], StepEngine())
    with pytest.raises(TypeError, match="tuple of AgreedValue"):
        Agreement(values=(1.0,))
    with pytest.raises(TypeError, match="stop"):
        Agreement(stop=1)
    with pytest.raises(TypeError, match="number"):
        AgreedValue().post("1")
    with pytest.raises(ValueError, match="finite"):
        AgreedValue().post(float("nan"))
    with pytest.raises(ValueError, match="agreement_timeout"):
        HookedSession([], StepEngine(), agreement_timeout=0)


def test_a_deferred_failure_is_posted_then_raised_at_the_next_run_on_every_rank():
    class FailsAtTwo(SessionRunHook):
        def after_run(self, run_context, run_values):
            if run_context.session.global_step == 2:
                raise KeyError("lost")

    log: List[Any] = []
    agreement = OtherRank()
    session = HookedSession([FailsAtTwo(), Recorder("b", log)], AgreeingEngine(agreement),
                            agree_across_ranks=True, defer_failures=True)
    session.begin()
    session.create()
    assert one_run(session) is False
    assert one_run(session) is False  # run 2 failed here: posted in its vote, not raised
    assert isinstance(agreement.failed, KeyError) and agreement.left is None
    with pytest.raises(KeyError, match="lost"):  # the run that reads it, as every rank
        one_run(session)
    # TF's rule at the failing run: later hooks' after_run skipped; none at the raising run
    assert [c for c in log if c[1] == "after_run"] == [("b", "after_run")]


def test_a_deferred_failure_keeps_a_stop_the_ranks_already_agreed():
    class FailsAtThree(SessionRunHook):
        def after_run(self, run_context, run_values):
            if run_context.session.global_step == 3:
                raise KeyError("lost")

    agreement = OtherRank(other_stops={2})  # read at run 3: every rank stops after it
    session = HookedSession([FailsAtThree()], AgreeingEngine(agreement),
                            agree_across_ranks=True, defer_failures=True)
    session.begin()
    session.create()
    assert [one_run(session) for _ in range(2)] == [False, False]
    assert one_run(session) is True  # failed here, posted, and still stops with the others
    with pytest.raises(KeyError, match="lost"):
        session.end()  # its end reads the vote that carried the failure: raised then
