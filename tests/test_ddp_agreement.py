"""Ranks that disagree agree: HookCallback under strategy="ddp" with 2 real CPU processes.

Each scenario is one launch of ``ddp_agreement_script.py``; a launch that hangs fails after
its timeout (every rank is killed), so a missing agreement shows as a failure, not a stuck CI.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_agreement_script.py")


def _launch(out_dir, mode: str):
    run_launch(SCRIPT, str(out_dir), mode)
    return [torch.load(out_dir / f"{mode}-rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def clocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("clocks")
    return out, _launch(out, "clocks")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("uneven"), "uneven")


def test_time_triggers_fire_at_the_same_steps_on_ranks_whose_clocks_disagree(clocks) -> None:
    _, (rank0, rank1) = clocks
    # both ranks decide on rank 0's clock (1 s per reading; rank 1's runs 2.7 times faster)
    assert rank0["saved"] == rank1["saved"] == [0, 4, 7, 8]
    assert rank0["logged"] == rank1["logged"] == [1, 4, 7]  # each log a torchmetrics compute()
    assert rank0["global_step"] == rank1["global_step"] == 8


def test_the_time_triggered_checkpoints_are_written_once_each(clocks) -> None:
    out, _ = clocks
    assert sorted(os.listdir(out / "ckpt")) == [f"model.ckpt-{s}" for s in (0, 4, 7, 8)]
    assert torch.load(out / "ckpt" / "model.ckpt-7", weights_only=False)["global_step"] == 7


def test_a_stop_requested_on_one_rank_ends_fit_at_the_same_step_on_both(uneven) -> None:
    rank0, rank1 = uneven
    # rank 1 asked at step 4; the vote of that run is read at the next: both stop at 5
    assert rank0["global_step"] == rank1["global_step"] == 5


def test_no_blocking_collective_is_issued_by_hook_callback_during_training_steps(uneven) -> None:
    for rank in uneven:
        counts = rank["collectives"]
        assert counts["batches"] == 5
        assert counts["blocking"] == 0
        assert counts["async"] == counts["batches"]  # one small non-blocking vote per run


def test_evaluations_with_uneven_batches_and_a_one_rank_stop_finish(uneven) -> None:
    rank0, rank1 = uneven
    # rank 0 has 3 batches and stops its evaluation after the first; rank 1 has 1 batch
    assert rank0["evaluation_runs"] == rank1["evaluation_runs"] == [1, 1, 1, 1]
    steps = [step for step, _ in rank0["evaluations"]]
    assert steps == [step for step, _ in rank1["evaluations"]] == [2, 4, 5, 5]
    for (_, a), (_, b) in zip(rank0["evaluations"], rank1["evaluations"]):
        assert torch.equal(a["mse"], b["mse"])  # compute() reduced across ranks at the end


def test_predict_with_uneven_batches_and_a_per_run_hook_finishes(uneven) -> None:
    rank0, rank1 = uneven
    assert (rank0["prediction_runs"], rank1["prediction_runs"]) == (3, 2)


def test_an_early_stop_decided_on_one_rank_lands_at_the_same_step_on_both(tmp_path) -> None:
    rank0, rank1 = _launch(tmp_path, "early")
    assert rank0["global_step"] == rank1["global_step"]
    # the checks ran at the same steps (rank 0's clock decides), the first on the first run
    assert rank0["checked"] == rank1["checked"] and rank0["checked"][0] == 1
    # rank 1's third validation (step 6) crossed (rank 0's never did); its next check asked,
    # and both ranks recorded the stop and applied it one run later
    first_check_after = min(step for step in rank1["checked"] if step > 6)
    assert rank1["global_step"] == first_check_after + 1
    assert rank0["stopped"] and rank1["stopped"]
    assert rank0["evaluations"][:3] == [2, 4, 6]
    # a resume from the checkpoint rank 0 wrote stays stopped on both ranks: nothing runs
    for resumed in (rank0["resumed"], rank1["resumed"]):
        assert resumed == {"global_step": rank0["global_step"], "stopped": True,
                           "checked": [], "validations": 0}


def test_a_hook_failing_on_one_rank_ends_fit_on_every_rank_with_an_error_naming_it(tmp_path):
    rank0, rank1 = _launch(tmp_path, "raise")
    assert rank1["error"] == ("ValueError", "boom on rank 1")  # its own, at the next batch end
    kind, text = rank0["error"]
    assert kind == "RankFailedError"
    assert text.startswith("lightning_finalops: rank 1 failed with ValueError: boom on rank 1.")
    # raised at one batch end on both (rank 1's failure waited a batch: DDP's backward of
    # the next batch needs every rank, so rank 1 could not leave it alone)
    assert rank0["global_step"] == rank1["global_step"] == 4


def test_a_nan_on_one_rank_fails_fit_on_every_rank_at_the_same_step(tmp_path):
    rank0, rank1 = _launch(tmp_path, "nan")
    for rank in (rank0, rank1):
        assert rank["error"] == ("NanLossDuringTrainingError", "NaN loss during training.")
    assert rank0["global_step"] == rank1["global_step"]


def test_sigterm_on_one_rank_stops_fit_at_one_step_saved_once_and_resumable(tmp_path):
    rank0, rank1 = _launch(tmp_path, "sigterm")
    for rank in (rank0, rank1):
        # sent to rank 1 at step 3, agreed in that batch's vote: both stop at 4, then raise
        # Lightning's own SIGTERMException, as its loops do
        assert rank["first"]["error"] == "SIGTERMException"
        assert rank["first"]["global_step"] == 4
        # fit(ckpt_path=...) restarts at that batch end and ends where an uninterrupted run does
        assert rank["resumed"]["restored_step"] == 4 and rank["resumed"]["global_step"] == 8
        assert torch.equal(rank["resumed"]["w"], rank["straight"]["w"])
    # one checkpoint for the stop (the saver's final save at the batch end), none twice
    assert rank0["files"] == ["model.ckpt-0", "model.ckpt-4", "model.ckpt-8"]
