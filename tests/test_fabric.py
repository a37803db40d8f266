"""``MonitoredTrainingSession(fabric=...)`` on Lightning Fabric, ``strategy="ddp"``, 2 CPU ranks.

``fabric_script.py`` runs twice (Fabric launches the second rank): a first launch in which
rank 1 alone asks to stop, then a second that resumes with ``fabric.load``. Every launch has
a timeout that kills all ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fabric_script.py")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric")
    results = {}
    for mode in ("first", "resume"):
        run_launch(SCRIPT, str(out), mode)
        results[mode] = [torch.load(out / f"{mode}-rank{r}.pt", weights_only=False)
                         for r in (0, 1)]
    return out, results


def test_a_stop_on_one_rank_ends_both_at_the_same_step(launches) -> None:
    _, results = launches
    assert [r["global_step"] for r in results["first"]] == [4, 4]


def test_checkpoints_are_fabric_checkpoints_written_once(launches) -> None:
    out, _ = launches
    assert sorted(os.listdir(out / "ckpt")) == [f"model.ckpt-{s}" for s in (0, 2, 4, 6)]
    saved = torch.load(out / "ckpt" / "model.ckpt-4", weights_only=False)
    assert saved["global_step"] == 4 and "module.module" in saved  # fabric.save's layout


def test_a_second_launch_resumes_both_ranks_with_fabric_load(launches) -> None:
    _, results = launches
    rank0, rank1 = results["resume"]
    assert rank0["restored_step"] == rank1["restored_step"] == 4
    assert torch.equal(rank0["restored_w"], rank1["restored_w"])
    assert torch.equal(rank0["restored_w"], results["first"][0]["w"])
    assert rank0["global_step"] == rank1["global_step"] == 6
    for mode in ("first", "resume"):
        a, b = (r["final"] for r in results[mode])
        assert torch.equal(a["mean_loss"], b["mean_loss"]) and torch.equal(a["w"], b["w"])


def test_a_rank_whose_data_ends_first_stops_the_other_one_run_later(tmp_path) -> None:
    run_launch(SCRIPT, str(tmp_path), "uneven")
    rank0, rank1 = (torch.load(tmp_path / f"uneven-rank{r}.pt", weights_only=False)
                    for r in (0, 1))
    assert rank0 == {"error": None, "global_step": 3}
    assert rank1 == {"error": None, "global_step": 5}  # and both reached fabric.barrier()


def test_an_exception_on_one_rank_ends_the_other_with_an_error_naming_it(tmp_path) -> None:
    run_launch(SCRIPT, str(tmp_path), "raise")
    rank0, rank1 = (torch.load(tmp_path / f"raise-rank{r}.pt", weights_only=False)
                    for r in (0, 1))
    assert rank1 == {"error": ("ValueError", "boom on rank 1"), "global_step": 3}
    assert rank0["error"][0] == "RankFailedError" and "rank 1 failed with ValueError" in (
        rank0["error"][1])
    assert rank0["global_step"] == 4
