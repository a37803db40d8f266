"""``MonitoredTrainingSession``: TF's default hooks, their order, defaults and restore."""

from __future__ import annotations

import glob
import os
from typing import List

import pytest
import torch
from conftest import Counter

from lightning_finalops import (
    CheckpointSaverHook,
    FinalOpsHook,
    MonitoredTrainingSession,
    SessionRunHook,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
)
from lightning_finalops.checkpoints import latest_checkpoint, list_checkpoints


class Noop(SessionRunHook):
    pass


def train(sess, model: torch.nn.Linear, optimizer: torch.optim.Optimizer, runs: int) -> None:
    x = torch.ones(4, 2)

    def step():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    for _ in range(runs):
        sess.run(step)


def steps(directory) -> List[int]:
    return [step for step, _ in list_checkpoints(str(directory))]


def test_chief_hooks_come_in_tfs_order(tmp_path):
    first, last = Noop(), Noop()
    sess = MonitoredTrainingSession(
        checkpoint_dir=tmp_path, hooks=[last], chief_only_hooks=[first], summary_op={"l": "loss"}
    )
    assert [type(h) for h in sess.hooks] == [
        Noop, StepCounterHook, SummarySaverHook, CheckpointSaverHook, Noop
    ]
    assert sess.hooks[0] is first and sess.hooks[-1] is last
    sess.close()


def test_a_worker_runs_only_its_own_hooks(tmp_path):
    mine = Noop()
    sess = MonitoredTrainingSession(
        is_chief=False, checkpoint_dir=tmp_path, hooks=[mine], chief_only_hooks=[Noop()]
    )
    assert sess.hooks == (mine,)
    sess.close()
    assert steps(tmp_path) == []


def test_without_a_directory_there_are_no_default_hooks():
    with MonitoredTrainingSession() as sess:
        assert sess.hooks == ()


def test_default_checkpoints_every_600_secs_so_only_at_creation_and_end(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path, modules=model, optimizers=optimizer
    ) as sess:
        train(sess, model, optimizer, 3)
    assert steps(tmp_path) == [0, 3]


def test_none_turns_the_default_hooks_off(tmp_path):
    sess = MonitoredTrainingSession(
        checkpoint_dir=tmp_path, save_checkpoint_secs=None, log_step_count_steps=None
    )
    assert sess.hooks == ()
    sess.close()


def test_a_second_session_resumes_from_the_latest_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path, save_checkpoint_steps=2, modules=model, optimizers=optimizer
    ) as sess:
        train(sess, model, optimizer, 5)
    assert steps(tmp_path) == [0, 2, 4, 5]

    restored = torch.nn.Linear(2, 1)
    final = FinalOpsHook({"w": restored.weight})
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path,
        save_checkpoint_steps=2,
        hooks=[final],
        modules=restored,
        optimizers=torch.optim.SGD(restored.parameters(), lr=0.1),
    ) as sess:
        assert sess.global_step == 5
    torch.testing.assert_close(final.final_ops_values["w"], model.weight.detach())


def test_step_counter_and_summaries_are_written_to_the_checkpoint_dir(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path,
        log_step_count_steps=2,
        save_summaries_steps=2,
        summary_op={"loss": "loss"},
        modules=model,
        optimizers=optimizer,
    ) as sess:
        train(sess, model, optimizer, 6)
    assert glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"loss", "global_step/sec"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 3, 5]


def test_summary_dir_overrides_the_checkpoint_dir(tmp_path):
    summaries = tmp_path / "summaries"
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path / "ckpt", summary_dir=summaries, log_step_count_steps=1
    ) as sess:
        for _ in range(3):
            sess.run(lambda: None)
    assert glob.glob(os.path.join(summaries, "events.out.tfevents.*"))
    assert not glob.glob(os.path.join(tmp_path / "ckpt", "events.out.tfevents.*"))


def test_is_chief_is_what_hooks_see_as_session_is_chief(tmp_path):
    for is_chief in (True, False):
        with MonitoredTrainingSession(is_chief=is_chief) as sess:
            assert sess.raw_session().is_chief is is_chief


def test_zero_or_negative_periods_turn_the_default_hooks_off_as_in_tf(tmp_path):
    sess = MonitoredTrainingSession(
        checkpoint_dir=tmp_path, save_checkpoint_steps=-1, log_step_count_steps=0,
        summary_op={"loss": "loss"}, save_summaries_steps=-5,
    )
    assert sess.hooks == ()
    sess.close()
    assert steps(tmp_path) == []


def test_an_empty_summary_dir_means_the_checkpoint_dir(tmp_path):
    sess = MonitoredTrainingSession(checkpoint_dir=tmp_path, summary_dir="",
                                    save_checkpoint_secs=None, log_step_count_steps=1)
    sess.run(lambda: None)
    sess.run(lambda: None)
    sess.close()
    assert glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))


def test_a_worker_restores_its_hooks_state_not_the_chiefs_only_hooks(tmp_path):
    with MonitoredTrainingSession(
        checkpoint_dir=tmp_path, save_checkpoint_steps=1,
        chief_only_hooks=[Counter(runs=10, name="chief")], hooks=[Counter()],
    ) as sess:
        sess.run(lambda: None)
        sess.run(lambda: None)
    # TF's order: chief_only_hooks, the saver, hooks; the checkpoint of a run is written
    # once every after_run of it ran (TF's had the user hook's count of the run before) ...
    mid = torch.load(tmp_path / "model.ckpt-1", weights_only=False)["session"]["hooks"]
    assert mid["Counter[chief]"] == {"runs": 11} and mid["Counter"] == {"runs": 1}
    # ... and the last one after every end(): all of it is in
    saved = torch.load(latest_checkpoint(str(tmp_path)), weights_only=False)["session"]["hooks"]
    assert saved["Counter[chief]"] == {"runs": 12} and saved["Counter"] == {"runs": 2}

    worker_chief_only, worker_mine = Counter(runs=7, name="chief"), Counter(runs=7)
    with MonitoredTrainingSession(
        is_chief=False, checkpoint_dir=tmp_path,
        chief_only_hooks=[worker_chief_only], hooks=[worker_mine],
    ) as sess:
        assert sess.global_step == 2
        assert worker_mine.runs == 2  # its own saved state, not the chief-only hook's
    assert worker_chief_only.runs == 7  # a worker neither runs nor restores it


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(TypeError, match=r"hooks\[0\] must be a SessionRunHook"):
        MonitoredTrainingSession(hooks=["loss"])
    with pytest.raises(TypeError, match="chief_only_hooks must be a list"):
        MonitoredTrainingSession(chief_only_hooks=Noop())
    with pytest.raises(TypeError, match="save_checkpoint_steps must be an int or None, got str"):
        MonitoredTrainingSession(checkpoint_dir=tmp_path, save_checkpoint_steps="10")
    for period in ("save_checkpoint_steps", "save_summaries_steps", "log_step_count_steps"):
        with pytest.raises(TypeError, match=f"{period} must be an int or None, got float"):
            MonitoredTrainingSession(checkpoint_dir=tmp_path, **{period: float("nan")})
    for period in ("save_checkpoint_secs", "save_summaries_secs"):
        with pytest.raises(ValueError, match=f"{period} must be a finite number of seconds"):
            MonitoredTrainingSession(checkpoint_dir=tmp_path, **{period: float("nan")})
    with pytest.raises(TypeError, match=r"checkpoint_dir must be a str or os.PathLike path"):
        MonitoredTrainingSession(checkpoint_dir=5)
    with pytest.raises(TypeError, match=r"checkpoint_dir must be .* got bytes"):
        MonitoredTrainingSession(checkpoint_dir=b"ckpts")
    with pytest.raises(TypeError, match=r"is_chief must be a bool or None, got str"):
        MonitoredTrainingSession(is_chief="no")
    with pytest.raises(ValueError, match="Can not provide both every_secs and every_steps."):
        MonitoredTrainingSession(
            checkpoint_dir=tmp_path, save_checkpoint_secs=10, save_checkpoint_steps=10
        )
    with pytest.raises(ValueError, match="summary_op is written to summary_dir"):
        MonitoredTrainingSession(summary_op={"loss": "loss"})
    with pytest.raises(TypeError, match="master"):
        MonitoredTrainingSession(master="grpc://localhost:2222")  # no servers here
    assert steps(tmp_path) == []


def _rank_main(rank: int, init_file: str, checkpoint_dir: str, results: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        sess = MonitoredTrainingSession(checkpoint_dir=checkpoint_dir, save_checkpoint_steps=1)
        with sess:
            for _ in range(2):
                sess.run(lambda: None)
        chief = sess.raw_session().is_chief
        with open(os.path.join(results, f"rank{rank}"), "w") as f:
            f.write(f"{chief} {[type(h).__name__ for h in sess.hooks]}")
    finally:
        torch.distributed.destroy_process_group()


def test_under_torch_distributed_only_rank_0_is_the_chief(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "results").mkdir()
    mp.spawn(
        _rank_main,
        args=(str(tmp_path / "init"), str(tmp_path / "ckpt"), str(tmp_path / "results")),
        nprocs=2,
    )
    assert (tmp_path / "results" / "rank0").read_text() == (
        "True ['StepCounterHook', 'CheckpointSaverHook']"
    )
    # the worker runs none of the chief's hooks: a stand-in votes for what the saver declares
    assert (tmp_path / "results" / "rank1").read_text() == "False ['_ChiefHookAgreement']"
    assert steps(tmp_path / "ckpt") == [0, 1, 2]


def test_rerunning_a_finished_training_session_records_nothing(tmp_path):
    for _ in range(3):
        final = FinalOpsHook({"one": lambda: 1})
        with MonitoredTrainingSession(checkpoint_dir=tmp_path, save_checkpoint_steps=1,
                                      hooks=[StopAtStepHook(last_step=3), final]) as sess:
            while not sess.should_stop():
                sess.run(lambda: None)
        assert [step for step, _ in final.final_ops_history] == [3]
