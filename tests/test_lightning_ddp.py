"""HookCallback under strategy="ddp" with 2 real CPU processes (gloo)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_fit_script.py")


def _run(tmp_path, mode: str) -> None:
    run_launch(SCRIPT, str(tmp_path), mode)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """Where both runs wrote their results (``*.pt``) and checkpoints (``ckpt-<mode>/``)."""
    out = tmp_path_factory.mktemp("ddp")
    _run(out, "ddp")
    _run(out, "single")
    return out


@pytest.fixture(scope="module")
def results(out_dir):
    return {
        name[:-3]: torch.load(out_dir / name, weights_only=False)
        for name in os.listdir(out_dir)
        if name.endswith(".pt")
    }


def test_both_ranks_ran_and_agreed_on_a_stop_requested_on_one_rank(results) -> None:
    assert set(results) == {"ddp-rank0", "ddp-rank1", "single-rank0"}
    # rank 1 alone asked to stop at step 5; both ranks stopped one run later, none hung
    assert results["ddp-rank0"]["global_step"] == results["ddp-rank1"]["global_step"] == 6
    assert results["single-rank0"]["global_step"] == 6  # the single process plays rank 1


def _assert_same(a, b) -> None:
    assert [step for step, _ in a] == [step for step, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.allclose(x[key], y[key], atol=1e-6), (key, x[key], y[key])


def test_final_values_are_identical_on_both_ranks(results) -> None:
    _assert_same(results["ddp-rank0"]["evaluations"], results["ddp-rank1"]["evaluations"])
    _assert_same(results["ddp-rank0"]["training"], results["ddp-rank1"]["training"])


def test_final_values_equal_the_single_process_values_on_the_same_data(results) -> None:
    ddp, single = results["ddp-rank0"], results["single-rank0"]
    # end of epoch 0, then the validation Lightning runs when the stop is requested
    assert [step for step, _ in ddp["evaluations"]] == [4, 6]
    _assert_same(ddp["evaluations"], single["evaluations"])
    _assert_same(ddp["training"], single["training"])


def test_checkpoint_saver_hook_under_ddp_writes_the_same_checkpoints_as_one_process(
    out_dir,
) -> None:
    ddp_dir, single_dir = out_dir / "ckpt-ddp", out_dir / "ckpt-single"
    # saved at creation, every 2 steps, and the stop step; nothing half-written left
    assert sorted(os.listdir(ddp_dir)) == sorted(os.listdir(single_dir)) == [
        f"model.ckpt-{step}" for step in (0, 2, 4, 6)
    ]
    ddp = torch.load(ddp_dir / "model.ckpt-6", weights_only=False)
    single = torch.load(single_dir / "model.ckpt-6", weights_only=False)
    assert ddp["global_step"] == single["global_step"] == 6
    for key, value in single["state_dict"].items():
        assert torch.allclose(ddp["state_dict"][key], value, atol=1e-6), key
    # the hooks' state, for fit(ckpt_path=...)
    assert [key for key in ddp["callbacks"] if key.startswith("HookCallback")]
