"""``CheckpointSaverHook``: TF's basic_session_run_hooks_test.py cases and tf_semantics.md §6."""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from typing import Any, Dict, List

import pytest
import torch
from conftest import make_batches
from lightning_models import make_module_class, make_trainer

import lightning_finalops.hooks.timers as timers
from lightning_finalops import (
    FinalOpsHook,
    HookCallback,
    MonitoredSession,
    SessionRunHook,
    StopAtStepHook,
)
from lightning_finalops.checkpoints import latest_checkpoint, list_checkpoints
from lightning_finalops.hooks.checkpoint import CheckpointSaverHook, CheckpointSaverListener
from lightning_finalops.session_run_hook import (
    Coordinator,
    RawSession,
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunValues,
)

T0 = 1484695987.209386  # TF's "realistic start time"


class CountingListener(CheckpointSaverListener):
    """Counts calls like TF's MockCheckpointSaverListener; logs ``(tag, method, step)``."""

    def __init__(self, log: List[Any] = None, tag: str = "L") -> None:
        self.counts = {"begin": 0, "before_save": 0, "after_save": 0, "end": 0}
        self.log = [] if log is None else log
        self.tag = tag
        self.ask_for_stop = False
        self.saved_steps: List[int] = []
        self.end_step: Any = None

    def begin(self) -> None:
        self.counts["begin"] += 1

    def before_save(self, session, global_step_value) -> None:
        self.counts["before_save"] += 1
        self.log.append((self.tag, "before_save", global_step_value))

    def after_save(self, session, global_step_value):
        self.counts["after_save"] += 1
        self.saved_steps.append(global_step_value)
        self.log.append((self.tag, "after_save", global_step_value))
        return self.ask_for_stop

    def end(self, session, global_step_value) -> None:
        self.counts["end"] += 1
        self.end_step = global_step_value


class Counter(SessionRunHook):
    """A stateful hook: counts runs, records the global step it is created at."""

    def __init__(self) -> None:
        self.runs = 0
        self.seen_at_creation: List[int] = []

    def after_create_session(self, session, coord) -> None:
        self.seen_at_creation.append(session.global_step)

    def after_run(self, run_context, run_values) -> None:
        self.runs += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"runs": self.runs}

    def load_state_dict(self, state_dict) -> None:
        self.runs = state_dict["runs"]


def steps(directory, basename: str = "model.ckpt") -> List[int]:
    return [step for step, _ in list_checkpoints(str(directory), basename)]


def saved_global_step(directory, step: int) -> int:
    path = os.path.join(str(directory), f"model.ckpt-{step}")
    return torch.load(path, weights_only=False)["global_step"]


def run_increments(hook: CheckpointSaverHook, n: int, *extra_hooks: SessionRunHook) -> None:
    var = torch.tensor(0.0)
    with MonitoredSession([hook, *extra_hooks]) as sess:
        for _ in range(n):
            sess.run(lambda: var.add_(1))


@pytest.fixture
def clock(monkeypatch):
    now = [T0]
    monkeypatch.setattr(timers, "clock", lambda: now[0])
    return now


# -- when it saves (TF's cases) ------------------------------------------------------------------


def test_saves_a_checkpoint_at_session_creation(tmp_path):
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=2)]):
        assert steps(tmp_path) == [0]
        assert saved_global_step(tmp_path, 0) == 0


def test_save_steps_saves_every_n_steps_and_the_last_step_at_the_end(tmp_path):
    seen = []
    var = torch.tensor(0.0)
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=2)]) as sess:
        for _ in range(5):
            sess.run(lambda: var.add_(1))
            seen.append(steps(tmp_path))
    assert seen == [[0], [0, 2], [0, 2], [0, 2, 4], [0, 2, 4]]
    assert steps(tmp_path) == [0, 2, 4, 5]
    assert [saved_global_step(tmp_path, s) for s in (0, 2, 4, 5)] == [0, 2, 4, 5]


def test_save_steps_listener_counts_over_five_runs(tmp_path):
    listener = CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener]), 5)
    assert listener.counts == {"begin": 1, "before_save": 4, "after_save": 4, "end": 1}
    assert listener.saved_steps == [0, 2, 4, 5]
    assert listener.end_step == 5


def test_listener_with_monitored_session(tmp_path):
    # TF: save_steps=1, two runs under SingularMonitoredSession -> 3 saves (0, 1, 2).
    listener = CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener]), 2)
    assert listener.counts == {"begin": 1, "before_save": 3, "after_save": 3, "end": 1}
    hook = CheckpointSaverHook(tmp_path, save_steps=1)
    with MonitoredSession([hook], checkpoint_dir=str(tmp_path)) as restored:
        assert restored.global_step == 2


def test_a_session_without_the_saver_hook_restores_the_global_step(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 2)
    with MonitoredSession(checkpoint_dir=str(tmp_path)) as restored:
        assert restored.global_step == 2


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_naming_it(
    tmp_path, caplog
):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 3)
    latest = tmp_path / "model.ckpt-3"
    latest.write_bytes(latest.read_bytes()[:100])  # cut, as a disk full or a crash of cp would
    with caplog.at_level(logging.INFO, logger="lightning_finalops"):
        with MonitoredSession(checkpoint_dir=str(tmp_path)) as restored:
            assert restored.global_step == 2
    text = caplog.text
    assert f"Skipping checkpoint {latest}, which cannot be loaded" in text
    assert f"Restoring parameters from {tmp_path / 'model.ckpt-2'} (global step 2)." in text


def test_checkpoints_that_all_fail_to_load_are_an_error_naming_each(tmp_path):
    (tmp_path / "model.ckpt-1").write_bytes(b"not a checkpoint")
    (tmp_path / "model.ckpt-2").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"No checkpoint .* can be loaded: .*model.ckpt-2.*"
                                           r"model.ckpt-1"):
        MonitoredSession(checkpoint_dir=str(tmp_path))


def test_a_checkpoint_dir_that_is_a_file_is_an_error(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 1)
    file = str(tmp_path / "model.ckpt-1")
    with pytest.raises(ValueError, match="checkpoint_dir must be a directory, but .* is a file"):
        MonitoredSession(checkpoint_dir=file)
    with pytest.raises(ValueError, match="checkpoint_dir must be a directory"):
        CheckpointSaverHook(file, save_steps=1)


def test_the_next_save_removes_what_a_crashed_save_left_behind(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 1)
    for stray in ("model.ckpt-2.k3j9.tmp", "model.ckpt-2.tmp"):
        (tmp_path / stray).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=1)],
                          checkpoint_dir=str(tmp_path)) as sess:
        sess.run(lambda: None)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-0", "model.ckpt-1", "model.ckpt-2",
                                            "notes.tmp"]


def test_two_listeners_get_the_same_calls(tmp_path):
    first, second = CountingListener(), CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, listeners=[first, second]), 2)
    assert first.counts == {"begin": 1, "before_save": 3, "after_save": 3, "end": 1}
    assert second.counts == first.counts
    assert second.saved_steps == first.saved_steps == [0, 1, 2]


def test_save_secs_saves_periodically(tmp_path, clock):
    hook = CheckpointSaverHook(tmp_path, save_secs=2)
    var = torch.tensor(0.0)
    with MonitoredSession([hook]) as sess:  # saved at step 0, at T0
        for offset in (0.0, 0.5):
            clock[0] = T0 + offset
            sess.run(lambda: var.add_(1))  # steps 1, 2: not saved
        assert steps(tmp_path) == [0]
        clock[0] = T0 + 2.5
        sess.run(lambda: var.add_(1))  # step 3: saved
        for offset in (2.6, 2.7):
            clock[0] = T0 + offset
            sess.run(lambda: var.add_(1))  # steps 4, 5: not saved
        assert steps(tmp_path) == [0, 3]
        clock[0] = T0 + 10
        sess.run(lambda: var.add_(1))  # step 6: saved
        assert steps(tmp_path) == [0, 3, 6]
    assert steps(tmp_path) == [0, 3, 6]  # the last step was just saved: nothing at the end


def test_save_secs_calls_listeners_periodically(tmp_path, clock):
    listener = CountingListener()
    hook = CheckpointSaverHook(tmp_path, save_secs=2, listeners=[listener])
    var = torch.tensor(0.0)
    sess = MonitoredSession([hook])  # saved at step 0, at T0
    for offset in (0.5, 0.5, 3.0, 3.5, 4.0, 6.5, 7.0):
        clock[0] = T0 + offset
        sess.run(lambda: var.add_(1))  # saves at steps 3 (T0+3.0) and 6 (T0+6.5)
    clock[0] = T0 + 7.5
    sess.close()  # step 7 was not saved: saved at the end
    assert listener.counts == {"begin": 1, "before_save": 4, "after_save": 4, "end": 1}
    assert listener.saved_steps == [0, 3, 6, 7]


def test_end_saves_the_final_step_when_it_was_not_saved(tmp_path, clock):
    listener = CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_secs=2, listeners=[listener]), 2)
    assert steps(tmp_path) == [0, 2]
    assert saved_global_step(tmp_path, 2) == 2
    assert listener.saved_steps == [0, 2]


def test_end_does_not_save_again_the_step_just_saved(tmp_path):
    listener = CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener]), 4)
    assert listener.saved_steps == [0, 2, 4]  # no second save of step 4 in end()
    assert listener.end_step == 4


def test_a_session_without_runs_saves_once(tmp_path):
    listener = CountingListener()
    run_increments(CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener]), 0)
    assert listener.counts == {"begin": 1, "before_save": 1, "after_save": 1, "end": 1}


def test_a_checkpoint_is_written_once_every_after_run_of_its_run_ran(tmp_path):
    """TF wrote it inside the saver's after_run; here the step is final first."""
    existed = []
    var = torch.tensor(0.0)

    class LaterHook(SessionRunHook):
        def after_run(self, run_context, run_values):
            step = run_context.session.global_step
            existed.append((step, os.path.exists(tmp_path / f"model.ckpt-{step}")))

    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=2), LaterHook()]) as sess:
        for _ in range(3):
            sess.run(lambda: var.add_(1))
            existed.append(steps(tmp_path))
    assert existed == [(1, False), [0], (2, False), [0, 2], (3, False), [0, 2]]


def test_it_fetches_nothing_per_run(tmp_path):
    hook = CheckpointSaverHook(tmp_path, save_steps=1)
    with MonitoredSession([hook]) as sess:
        context = SessionRunContext(SessionRunArgs(None), sess.raw_session())
        assert hook.before_run(context) is None


# -- listeners -----------------------------------------------------------------------------------


def test_listener_requesting_a_stop_in_after_save_stops_after_that_run(tmp_path):
    listener = CountingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener])
    var = torch.tensor(0.0)
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: var.add_(1))
        assert not sess.should_stop()
        sess.run(lambda: var.add_(1))
        assert not sess.should_stop()
        listener.ask_for_stop = True
        sess.run(lambda: var.add_(1))
        assert sess.should_stop()
        with pytest.raises(RuntimeError, match="Run called even after should_stop requested."):
            sess.run(lambda: var.add_(1))
    assert var.item() == 3.0


def test_a_stop_request_from_the_save_at_session_creation_is_ignored(tmp_path):
    listener = CountingListener()
    listener.ask_for_stop = True
    var = torch.tensor(0.0)
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])]) as s:
        assert listener.saved_steps == [0]
        assert not s.should_stop()
        s.run(lambda: var.add_(1))  # step 1: no save, so no stop
        assert not s.should_stop()
        s.run(lambda: var.add_(1))  # step 2: saved, the listener's request now counts
        assert s.should_stop()


def test_every_after_save_is_called_even_when_the_first_asks_to_stop(tmp_path):
    stopper, other = CountingListener(), CountingListener()
    stopper.ask_for_stop = True
    var = torch.tensor(0.0)
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[stopper, other])
    with MonitoredSession([hook]) as sess:
        sess.run(lambda: var.add_(1))
        assert sess.should_stop()
    assert other.saved_steps == stopper.saved_steps == [0, 1]


def test_listeners_before_save_all_then_save_then_after_save_all(tmp_path):
    log: List[Any] = []

    def saver(session, path):
        log.append(("saver", os.path.basename(path), session.global_step))
        session.save_checkpoint(path)

    hook = CheckpointSaverHook(tmp_path, save_steps=1, saver=saver,
                               listeners=[CountingListener(log, "a"), CountingListener(log, "b")])
    with MonitoredSession([hook]):
        pass
    assert log == [
        ("a", "before_save", 0), ("b", "before_save", 0),
        ("saver", "model.ckpt-0", 0),
        ("a", "after_save", 0), ("b", "after_save", 0),
    ]


def test_before_save_sees_no_file_and_after_save_sees_the_file(tmp_path):
    seen = []

    class Probe(CheckpointSaverListener):
        def before_save(self, session, global_step_value):
            seen.append(("before", os.path.exists(tmp_path / f"model.ckpt-{global_step_value}")))

        def after_save(self, session, global_step_value):
            seen.append(("after", os.path.exists(tmp_path / f"model.ckpt-{global_step_value}")))

    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=1, listeners=[Probe()])]):
        pass
    assert seen == [("before", False), ("after", True)]


def test_base_listener_methods_are_no_ops(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1,
                                       listeners=[CheckpointSaverListener()]), 2)
    assert steps(tmp_path) == [0, 1, 2]


# -- validation (TF's messages and order) --------------------------------------------------------


def test_saver_and_scaffold_both_given_is_tf_error_before_the_timer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^You cannot provide both saver and scaffold\.$"):
        CheckpointSaverHook(tmp_path, saver=lambda s, p: None, scaffold=object())


def test_neither_save_secs_nor_save_steps_is_tf_timer_error(tmp_path):
    message = r"^Either every_secs or every_steps should be provided\.$"
    with pytest.raises(ValueError, match=message):
        CheckpointSaverHook(tmp_path)


def test_both_save_secs_and_save_steps_is_tf_timer_error(tmp_path):
    with pytest.raises(ValueError, match=r"^Can not provide both every_secs and every_steps\.$"):
        CheckpointSaverHook(tmp_path, save_secs=10, save_steps=20)


def test_a_scaffold_without_a_saver_is_refused_after_the_timer_errors(tmp_path):
    with pytest.raises(ValueError, match="Either every_secs"):
        CheckpointSaverHook(tmp_path, scaffold=object())
    with pytest.raises(ValueError, match="scaffold must be None"):
        CheckpointSaverHook(tmp_path, save_steps=1, scaffold=object())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"checkpoint_dir": 3}, TypeError, r"checkpoint_dir must be a str or os.PathLike path, "
         r"got int \(3\)"),
        ({"checkpoint_dir": b"dir"}, TypeError, "checkpoint_dir must be a str or os.PathLike "
         "path, got bytes"),
        ({"checkpoint_dir": ""}, ValueError, "checkpoint_dir must be a non-empty path"),
        ({"checkpoint_basename": 1}, TypeError, "checkpoint_basename must be a str"),
        ({"checkpoint_basename": "a/b"}, ValueError, "without a directory"),
        ({"saver": "saver"}, TypeError, r"saver must be None or a callable saver\(session, path\)"),
        ({"listeners": CheckpointSaverListener()}, TypeError, "listeners must be a list"),
        ({"listeners": [CheckpointSaverListener(), 3]}, TypeError, r"listeners\[1\] must be a"),
        ({"max_to_keep": "5"}, TypeError, "max_to_keep must be an int or None, got str"),
        ({"max_to_keep": True}, TypeError, "max_to_keep must be an int or None, got bool"),
        ({"max_to_keep": -1}, ValueError, "max_to_keep must be an int >= 0, got -1"),
    ],
)
def test_constructor_misuse_names_the_argument(tmp_path, kwargs, error, match):
    arguments = {"checkpoint_dir": str(tmp_path), "save_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        CheckpointSaverHook(**arguments)


def test_constructing_the_hook_touches_no_file(tmp_path):
    target = tmp_path / "not" / "yet"
    CheckpointSaverHook(target, save_steps=1)
    assert not target.exists()


def test_checkpoint_dir_is_created_in_begin_and_may_be_a_path(tmp_path):
    target = tmp_path / "a" / "b"
    hook = CheckpointSaverHook(pathlib.Path(target), save_steps=1)
    hook.begin()
    assert target.is_dir()
    assert hook.checkpoint_dir == str(target)


def test_save_graph_def_writes_nothing_but_checkpoints(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, save_graph_def=True), 1)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-0", "model.ckpt-1"]


def test_checkpoint_basename_names_the_files(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, checkpoint_basename="net"), 1)
    assert sorted(os.listdir(tmp_path)) == ["net-0", "net-1"]


def test_logs_saving_checkpoints_at_info_with_tf_text(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_finalops")
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 0)
    expected = f"Saving checkpoints for 0 into {os.path.join(str(tmp_path), 'model.ckpt')}."
    records = [r for r in caplog.records if r.name == "lightning_finalops"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, expected)]


# -- saver and atomicity -------------------------------------------------------------------------


def test_a_custom_saver_writes_instead_of_the_session(tmp_path):
    calls = []

    def saver(session, path):
        calls.append((session.global_step, path))
        pathlib.Path(path).write_text(str(session.global_step))

    run_increments(CheckpointSaverHook(tmp_path, save_steps=2, saver=saver), 3)
    assert calls == [(s, os.path.join(str(tmp_path), f"model.ckpt-{s}")) for s in (0, 2, 3)]
    assert (tmp_path / "model.ckpt-3").read_text() == "3"  # not a torch file: the saver's


def test_a_save_failing_mid_write_leaves_no_checkpoint_under_its_name(tmp_path, monkeypatch):
    listener = CountingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as file:
            file.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    var = torch.tensor(0.0)
    with pytest.raises(OSError, match="disk full"):
        with MonitoredSession([hook]) as sess:
            sess.run(lambda: var.add_(1))
            monkeypatch.setattr(torch, "save", save_half_then_fail)
            sess.run(lambda: var.add_(1))  # step 2: the save fails
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.ckpt-0"]  # no model.ckpt-2, no stray temporary file
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-0")
    assert saved_global_step(tmp_path, 0) == 0
    assert listener.saved_steps == [0]  # no after_save for the failed save, no end()
    assert listener.counts["end"] == 0


# -- max_to_keep ---------------------------------------------------------------------------------


def test_max_to_keep_keeps_the_newest_checkpoints(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, max_to_keep=2), 5)
    assert steps(tmp_path) == [4, 5]


def test_max_to_keep_defaults_to_five_as_tf_saver(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1), 7)
    assert steps(tmp_path) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_max_to_keep_none_or_zero_keeps_every_checkpoint(tmp_path, max_to_keep):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, max_to_keep=max_to_keep), 6)
    assert steps(tmp_path) == [0, 1, 2, 3, 4, 5, 6]


def test_max_to_keep_counts_files_found_on_disk_as_older_than_its_own(tmp_path):
    for step in (7, 8):
        (tmp_path / f"model.ckpt-{step}").write_bytes(b"from an earlier run")
    (tmp_path / "other-1").write_bytes(b"not a checkpoint of this basename")
    run_increments(CheckpointSaverHook(tmp_path, save_steps=1, max_to_keep=3), 1)
    assert steps(tmp_path) == [0, 1, 8]  # 7 was deleted first; the hook's own files are kept
    assert (tmp_path / "other-1").exists()


class StubSession(RawSession):
    """A raw session of a non-chief rank that writes a small file."""

    def __init__(self, is_chief: bool) -> None:
        self._is_chief = is_chief
        self.step = 0

    def run(self, fetches, feed_dict=None):
        return None

    @property
    def global_step(self) -> int:
        return self.step

    @property
    def is_chief(self) -> bool:
        return self._is_chief

    def save_checkpoint(self, path: str, on_written=None, *, only_if_changed=False) -> None:
        pathlib.Path(path).write_bytes(b"x")
        if on_written is not None:
            on_written()


@pytest.mark.parametrize("is_chief, kept", [(True, [2]), (False, [0, 1, 2])])
def test_only_the_chief_deletes_old_checkpoints(tmp_path, is_chief, kept):
    hook = CheckpointSaverHook(tmp_path, save_steps=1, max_to_keep=1)
    session = StubSession(is_chief)
    hook.begin()
    hook.after_create_session(session, Coordinator())
    for _ in range(2):
        session.step += 1
        context = SessionRunContext(SessionRunArgs(None), session)
        hook.after_run(context, SessionRunValues(None, RunOptions(), RunMetadata()))
    hook.end(session)
    assert steps(tmp_path) == kept


def test_end_with_no_session_does_nothing(tmp_path):
    listener = CountingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener])
    sess = MonitoredSession([hook])
    sess.close()
    with pytest.raises(RuntimeError, match="Session is already closed."):
        sess.close()  # end(None): no save, no second listener end()
    assert listener.counts["end"] == 1
    assert listener.saved_steps == [0]


# -- resume under MonitoredSession ---------------------------------------------------------------


def make_training(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = make_batches(n=8)

    def train_step(step: int):
        x, y = batches[step]
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return model, optimizer, train_step


def train(sess: MonitoredSession, train_step, n: int) -> None:
    for _ in range(n):
        sess.run(lambda: train_step(sess.global_step))


def test_monitored_session_resumes_from_the_latest_checkpoint(tmp_path):
    model, optimizer, train_step = make_training(seed=0)
    counter = Counter()
    hooks = [CheckpointSaverHook(tmp_path, save_steps=2), counter]
    with MonitoredSession(hooks, modules=model, optimizers=optimizer) as sess:
        train(sess, train_step, 3)
    assert steps(tmp_path) == [0, 2, 3]

    model2, optimizer2, _ = make_training(seed=1)  # different initial weights
    counter2 = Counter()
    hooks2 = [CheckpointSaverHook(tmp_path, save_steps=2), counter2]
    with MonitoredSession(hooks2, modules=model2, optimizers=optimizer2,
                          checkpoint_dir=str(tmp_path)) as resumed:
        assert resumed.global_step == 3
        assert counter2.seen_at_creation == [3]  # after_create_session sees the restored step
        assert counter2.runs == 3  # hook state restored
        assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
        momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
        assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"], momentum)


def saved_hook_state(directory, step: int) -> Dict[str, Any]:
    path = os.path.join(str(directory), f"model.ckpt-{step}")
    return torch.load(path, weights_only=False)["session"]["hooks"]


def test_a_hook_listed_after_the_saver_is_saved_after_its_after_run(tmp_path):
    run_increments(CheckpointSaverHook(tmp_path, save_steps=2), 3, Counter())
    assert saved_hook_state(tmp_path, 2)["Counter"] == {"runs": 2}  # TF's saver had 1
    assert saved_hook_state(tmp_path, 3)["Counter"] == {"runs": 3}  # the final save: all in


def test_the_checkpoint_of_the_last_step_is_written_again_after_every_end(tmp_path):
    # TF's order (MonitoredTrainingSession): the saver first, then the user's hooks
    final = FinalOpsHook({"w": lambda: torch.tensor(7.0)})
    run_increments(CheckpointSaverHook(tmp_path, save_steps=2), 2, Counter(), final)
    assert steps(tmp_path) == [0, 2]  # saved in after_run at 2, not again in end()
    saved = saved_hook_state(tmp_path, 2)
    assert saved["Counter"] == {"runs": 2}
    assert saved[final.state_key]["final_ops_history"] == [(2, {"w": torch.tensor(7.0)})]
    resumed = FinalOpsHook({"w": lambda: torch.tensor(7.0)})
    with MonitoredSession([Counter(), resumed], checkpoint_dir=str(tmp_path)):
        assert resumed.final_ops_history == [(2, {"w": torch.tensor(7.0)})]


def test_a_hook_listed_before_the_saver_is_saved_after_its_after_run(tmp_path):
    var = torch.tensor(0.0)
    with MonitoredSession([Counter(), CheckpointSaverHook(tmp_path, save_steps=2)]) as sess:
        for _ in range(2):
            sess.run(lambda: var.add_(1))
    assert saved_hook_state(tmp_path, 2)["Counter"] == {"runs": 2}


def test_interrupted_and_resumed_training_equals_uninterrupted_training(tmp_path):
    model, optimizer, train_step = make_training(seed=0)
    with MonitoredSession([CheckpointSaverHook(tmp_path / "a", save_steps=100)],
                          modules=model, optimizers=optimizer) as sess:
        train(sess, train_step, 5)

    first, first_optimizer, first_step = make_training(seed=0)
    with MonitoredSession([CheckpointSaverHook(tmp_path / "b", save_steps=100)],
                          modules=first, optimizers=first_optimizer) as sess:
        train(sess, first_step, 3)
    second, second_optimizer, second_step = make_training(seed=1)
    with MonitoredSession([CheckpointSaverHook(tmp_path / "b", save_steps=100)],
                          modules=second, optimizers=second_optimizer,
                          checkpoint_dir=str(tmp_path / "b")) as sess:
        train(sess, second_step, 2)
        assert sess.global_step == 5
    assert torch.equal(second.weight, model.weight) and torch.equal(second.bias, model.bias)
    assert steps(tmp_path / "b") == [0, 3, 5]


# -- under a real Trainer.fit --------------------------------------------------------------------


def fit(tmp_path, max_epochs: int, hooks, ckpt_path=None):
    trainer = make_trainer(max_epochs=max_epochs, limit_val_batches=0,
                           callbacks=[HookCallback(training_hooks=hooks)])
    trainer.fit(make_module_class()(), ckpt_path=ckpt_path)
    return trainer


def test_fit_writes_lightning_checkpoints_on_the_step_grid(tmp_path):
    listener = CountingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])
    fit(tmp_path, 2, [hook])  # 4 batches an epoch: global steps 1..8
    assert steps(tmp_path) == [0, 2, 4, 6, 8]
    assert listener.saved_steps == [0, 2, 4, 6, 8]  # step 8 was just saved: not again at end
    assert listener.counts == {"begin": 1, "before_save": 5, "after_save": 5, "end": 1}
    checkpoint = torch.load(tmp_path / "model.ckpt-4", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert "state_dict" in checkpoint and "loops" in checkpoint  # a real Lightning checkpoint


def test_fit_saves_the_final_step_at_the_end(tmp_path):
    fit(tmp_path, 2, [CheckpointSaverHook(tmp_path, save_steps=3)])
    assert steps(tmp_path) == [0, 3, 6, 8]


class WeightsAtCreation(SessionRunHook):
    """Copies the LightningModule's weights in after_create_session."""

    def after_create_session(self, session, coord) -> None:
        self.weights = {k: v.clone() for k, v in session.pl_module.state_dict().items()}


def test_fit_resumes_from_the_latest_checkpoint_with_hook_state(tmp_path):
    # The saver comes last, so the checkpoint holds the other hooks' state after the run.
    counter = Counter()
    first = fit(tmp_path, 1, [counter, WeightsAtCreation(),
                              CheckpointSaverHook(tmp_path, save_steps=2)])
    latest = latest_checkpoint(str(tmp_path))
    assert latest == str(tmp_path / "model.ckpt-4")
    weights = {k: v.clone() for k, v in first.lightning_module.state_dict().items()}

    resumed_counter, probe = Counter(), WeightsAtCreation()
    hooks = [resumed_counter, probe, CheckpointSaverHook(tmp_path, save_steps=2)]
    second = fit(tmp_path, 2, hooks, ckpt_path=latest)
    assert resumed_counter.seen_at_creation == [4]  # after_create_session sees the restored step
    assert resumed_counter.runs == 8  # 4 restored + 4 new runs
    assert second.global_step == 8
    assert all(torch.equal(probe.weights[k], weights[k]) for k in weights)
    assert steps(tmp_path) == [0, 2, 4, 6, 8]


def test_a_listener_stop_request_stops_fit_after_that_batch(tmp_path):
    class StopAtFour(CheckpointSaverListener):
        def after_save(self, session, global_step_value):
            return global_step_value >= 4

    trainer = fit(tmp_path, 3, [CheckpointSaverHook(tmp_path, save_steps=2,
                                                    listeners=[StopAtFour()])])
    assert trainer.global_step == 4
    assert steps(tmp_path) == [0, 2, 4]


def test_a_single_process_that_is_not_the_chief_still_writes_its_checkpoints(tmp_path):
    with MonitoredSession([CheckpointSaverHook(tmp_path, save_steps=1)], is_chief=False) as sess:
        sess.run(lambda: None)
    assert steps(tmp_path) == [0, 1]


def test_across_ranks_needs_several_ranks():
    with pytest.raises(ValueError, match="across_ranks=True needs torch.distributed"):
        MonitoredSession(across_ranks=True)


# -- background saves ------------------------------------------------------------------------


class Recording(CheckpointSaverListener):
    def __init__(self, log) -> None:
        self.log = log

    def after_save(self, session, global_step_value):
        self.log.append(("after_save", global_step_value, threading.current_thread().name))

    def end(self, session, global_step_value):
        self.log.append(("end", global_step_value))


def test_an_async_save_holds_its_step_while_the_loop_goes_on(tmp_path, monkeypatch):
    from lightning_finalops import monitored_session

    writes = []
    real = monitored_session.atomic_torch_save

    def slow(obj, path):  # a write that takes a while, in the background thread
        time.sleep(0.05)
        writes.append(threading.current_thread().name)
        real(obj, path)

    monkeypatch.setattr(monitored_session, "atomic_torch_save", slow)
    net = torch.nn.Linear(2, 1)
    log = []
    weights = {}
    saver = CheckpointSaverHook(tmp_path, save_steps=2, async_save=True,
                                listeners=[Recording(log)])
    with MonitoredSession([saver, StopAtStepHook(last_step=6)], modules=net) as sess:
        weights[0] = net.weight.detach().clone()
        while not sess.should_stop():
            def step():
                with torch.no_grad():
                    net.weight.add_(1.0)  # the weights change right after each save is asked
            sess.run(step)
            weights[sess.global_step] = net.weight.detach().clone()
    for step in (0, 2, 4, 6):
        saved = torch.load(tmp_path / f"model.ckpt-{step}", weights_only=False)
        assert torch.equal(saved["modules"]["module"]["weight"], weights[step])  # a copy
    assert writes and all(name.startswith("lightning_finalops-checkpoint") for name in writes)
    # listeners hear of each save once it is complete, in the loop's thread, in order; the
    # session's end waits for the last one before the listeners' end
    assert log == [("after_save", s, "MainThread") for s in (0, 2, 4, 6)] + [("end", 6)]


def test_a_failure_waits_for_the_save_in_flight_which_commits(tmp_path):
    net = torch.nn.Linear(2, 1)
    saver = CheckpointSaverHook(tmp_path, save_steps=1, async_save=True)
    with pytest.raises(ZeroDivisionError):
        with MonitoredSession([saver], modules=net) as sess:
            sess.run(lambda: None)
            sess.run(lambda: 1 / 0)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-0", "model.ckpt-1"]
    assert torch.load(tmp_path / "model.ckpt-1", weights_only=False)["global_step"] == 1


def test_a_directory_checkpoint_in_one_process_round_trips_and_leaves_adam_untouched(tmp_path):
    import shutil

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    initial = net.weight.detach().clone()
    adam = torch.optim.Adam(net.parameters(), lr=0.1)
    saver = CheckpointSaverHook(tmp_path, save_steps=2)
    with MonitoredSession([saver, StopAtStepHook(last_step=3)], modules=net, optimizers=adam,
                          checkpoint_format="dcp") as sess:
        assert adam.state == {}  # saving at creation made no optimizer state (no fake step)
        while not sess.should_stop():
            def step():
                adam.zero_grad()
                net(torch.ones(1, 3)).sum().backward()
                adam.step()
            sess.run(step)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-0", "model.ckpt-2", "model.ckpt-3"]
    assert int(adam.state[net.weight]["step"]) == 3
    torch.manual_seed(1)
    other = torch.nn.Linear(3, 2)
    other_adam = torch.optim.Adam(other.parameters(), lr=0.1)
    MonitoredSession(modules=other, optimizers=other_adam, checkpoint_dir=str(tmp_path),
                     strict=False).close()
    assert torch.equal(other.weight, net.weight)
    assert torch.equal(other_adam.state[other.weight]["exp_avg"], adam.state[net.weight]["exp_avg"])
    # the creation checkpoint holds no optimizer state, and restores as such
    shutil.copytree(tmp_path / "model.ckpt-0", tmp_path / "creation" / "model.ckpt-0")
    fresh = torch.nn.Linear(3, 2)
    fresh_adam = torch.optim.Adam(fresh.parameters(), lr=0.1)
    with MonitoredSession(modules=fresh, optimizers=fresh_adam, strict=False,
                          checkpoint_dir=str(tmp_path / "creation")) as sess:
        assert sess.global_step == 0
    assert torch.equal(fresh.weight, initial) and fresh_adam.state == {}
