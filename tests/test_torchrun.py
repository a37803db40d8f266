"""``MonitoredTrainingSession`` in a plain loop under the real ``torchrun`` launcher (2 ranks).

``torchrun_script.py`` runs twice: a first launch in which rank 1 alone asks to stop, then a
second that resumes from the checkpoints. Every launch has a timeout that kills all ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_script.py")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    results = {}
    for mode in ("first", "resume"):
        run_launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   SCRIPT, str(out), mode)
        results[mode] = [torch.load(out / f"{mode}-rank{r}.pt", weights_only=False)
                         for r in (0, 1)]
    return out, results


def test_a_stop_on_one_rank_ends_every_rank_at_the_same_step(launches) -> None:
    _, results = launches
    rank0, rank1 = results["first"]
    # rank 1 asked after step 3; the request reaches rank 0 with that run's vote
    assert rank0["global_step"] == rank1["global_step"] == 4


def test_only_the_chief_writes_checkpoint_files(launches) -> None:
    out, results = launches
    assert sorted(os.listdir(out / "ckpt")) == [f"model.ckpt-{s}" for s in (0, 2, 4, 6)]
    for mode in ("first", "resume"):
        assert results[mode][0]["writes"] > 0 and results[mode][1]["writes"] == 0


def test_a_second_launch_resumes_every_rank_from_the_same_step_and_weights(launches) -> None:
    _, results = launches
    rank0, rank1 = results["resume"]
    assert rank0["restored_step"] == rank1["restored_step"] == 4
    assert torch.equal(rank0["restored_w"], rank1["restored_w"])
    assert torch.equal(rank0["restored_w"], results["first"][0]["w"])
    assert rank0["global_step"] == rank1["global_step"] == 6


def test_final_values_are_identical_on_every_rank(launches) -> None:
    _, results = launches
    for mode in ("first", "resume"):
        a, b = (r["final"] for r in results[mode])
        assert torch.equal(a["mean_loss"], b["mean_loss"])  # compute() reduced across ranks
        assert torch.equal(a["w"], b["w"])


def test_a_session_of_one_rank_alone_runs_without_the_others(launches) -> None:
    _, results = launches
    assert torch.equal(results["first"][0]["alone"], results["first"][0]["w"])


def test_a_stop_hook_for_the_chief_alone_is_refused_with_several_ranks(launches) -> None:
    _, results = launches
    for rank in results["first"]:
        assert "chief_only_hooks holds ['StopAtStepHook']" in rank["chief_only_stop"]


def test_in_memory_evaluation_on_shards_agrees_and_stops_every_rank_at_one_step(tmp_path):
    run_launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               SCRIPT, str(tmp_path), "evaluate")
    rank0, rank1 = (torch.load(tmp_path / f"evaluate-rank{r}.pt", weights_only=False)
                    for r in (0, 1))
    # 3 batches on rank 0, 1 on rank 1: torchmetrics reduced them, so both ranks hold the
    # mean over all 8 samples, and decided the same
    assert rank0["history"] == rank1["history"]
    assert rank0["history"][-1][1] == pytest.approx(rank0["by_hand"], rel=1e-5)
    assert rank0["stopped"] and rank1["stopped"]
    assert rank0["global_step"] == rank1["global_step"] < 40
