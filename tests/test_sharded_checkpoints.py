"""Sharded models (FSDP2's ``fully_shard``, 2 gloo ranks on CPU): nothing saved partial.

``sharded_script.py`` runs under ``torch.distributed.run``: a first launch to step 4, a
relaunch to step 8, an uninterrupted run to step 8, restores of the step-4 checkpoint on 1
and on 4 ranks, the same with background saves, and a run whose rank 1 is SIGKILLed in the
middle of its third save, then relaunched. ``lightning_fsdp_script.py`` does the first three
under Lightning's ``ModelParallelStrategy`` with ``HookCallback``. Every launch has a
timeout that kills all its processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_launch

from lightning_finalops import MonitoredSession, latest_checkpoint

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_script.py")
LIGHTNING_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "lightning_fsdp_script.py")
FABRIC_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "fabric_sharded_script.py")


def _launch(out, mode: str, ranks: int = 2) -> None:
    run_launch("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               SCRIPT, str(out), mode)


def _load(out, mode: str, rank: int = 0):
    return torch.load(out / f"{mode}-rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    _launch(out, "first")
    shutil.copytree(out / "ckpt", out / "ckpt1")
    for mode in ("resume", "straight", "async_first", "async_resume"):
        _launch(out, mode)
    _launch(out, "restore1", ranks=1)
    _launch(out, "restore4", ranks=4)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         SCRIPT, str(out), "kill_first"],
        env=env, capture_output=True, text=True, timeout=180, start_new_session=True,
    )
    assert killed.returncode != 0  # rank 1 died in its third save, the launcher saw it
    (out / "after_kill.txt").write_text("\n".join(sorted(os.listdir(out / "killed"))))
    _launch(out, "kill_resume")
    return out


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_rank_writes_its_shards_into_one_directory_per_checkpoint(out) -> None:
    assert sorted(os.listdir(out / "ckpt1")) == ["model.ckpt-0", "model.ckpt-2", "model.ckpt-4"]
    files = sorted(os.listdir(out / "ckpt1" / "model.ckpt-4"))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "session.pt"]


def test_a_relaunch_on_the_same_ranks_resumes_bit_exact(out) -> None:
    for rank in (0, 1):
        resumed, straight = _load(out, "resume", rank), _load(out, "straight", rank)
        assert resumed["restored_step"] == 4 and resumed["global_step"] == 8
        assert _equal(resumed["restored"], _load(out, "first", rank)["params"])
        assert _equal(resumed["params"], straight["params"])
        assert _equal(resumed["momentum"], straight["momentum"])


@pytest.mark.parametrize("mode, ranks", [("restore1", 1), ("restore4", 4)])
def test_a_sharded_checkpoint_restores_on_another_number_of_ranks(out, mode, ranks) -> None:
    first = _load(out, "first")
    for rank in range(ranks):
        restored = _load(out, mode, rank)
        assert restored["restored_step"] == 4
        assert _equal(restored["restored"], first["params"])
        assert _equal(restored["momentum"], first["momentum"])


def test_a_sharded_checkpoint_restores_into_an_unsharded_model_in_one_process(out) -> None:
    first = _load(out, "first")
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with MonitoredSession(modules=net, optimizers=optimizer, checkpoint_dir=str(out / "ckpt1"),
                          strict=False) as sess:
        assert sess.global_step == 4
    assert _equal(list(net.parameters()), first["params"])
    assert _equal([optimizer.state[p]["momentum_buffer"] for p in net.parameters()],
                  first["momentum"])
    evaluation = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 4))
    with MonitoredSession(modules=evaluation, checkpoint_dir=str(out / "ckpt1")) as sess:
        assert sess.global_step == 4  # the model alone: weights and step, optimizers skipped
    assert _equal(list(evaluation.parameters()), first["params"])


def test_async_sharded_saves_resume_bit_exact_too(out) -> None:
    assert sorted(os.listdir(out / "async")) == [f"model.ckpt-{s}" for s in (0, 2, 4, 6, 8)]
    for rank in (0, 1):
        resumed, straight = _load(out, "async_resume", rank), _load(out, "straight", rank)
        assert resumed["restored_step"] == 4
        assert _equal(resumed["restored"], _load(out, "first", rank)["params"])
        assert _equal(resumed["params"], straight["params"])
        assert _equal(resumed["momentum"], straight["momentum"])


def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint_the_latest(out) -> None:
    # rank 0 wrote its shards of step 4, rank 1 none: only the uncommitted directory holds them
    assert (out / "after_kill.txt").read_text().split() == [
        "model.ckpt-0", "model.ckpt-2", "model.ckpt-4.tmp"]
    resumed, straight = _load(out, "kill_resume"), _load(out, "straight")
    assert resumed["restored_step"] == 2  # the last committed checkpoint
    assert _equal(resumed["params"], straight["params"])
    assert _equal(resumed["momentum"], straight["momentum"])
    assert latest_checkpoint(str(out / "killed")).endswith("model.ckpt-8")
    assert not any(name.endswith(".tmp") for name in os.listdir(out / "killed"))


def test_final_ops_over_a_sharded_weight_give_the_full_value_on_every_rank(out) -> None:
    rank0, rank1 = _load(out, "first", 0)["final"], _load(out, "first", 1)["final"]
    full = _load(out, "first", 0)["params"][0]
    for final in (rank0, rank1):
        assert type(final["w0"]) is torch.Tensor and torch.equal(final["w0"], full)
        assert torch.allclose(final["norm"], full.norm())



@pytest.fixture(scope="module", params=["lightning", "fabric"])
def framework_out(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{request.param}_sharded")
    for mode in ("first", "resume", "straight"):
        run_launch(LIGHTNING_SCRIPT if request.param == "lightning" else FABRIC_SCRIPT,
                   str(out), mode)
    return out


def test_lightning_and_fabric_sharded_checkpoints_resume_bit_exact(framework_out):
    """Lightning's ModelParallelStrategy (fit(ckpt_path=...)) and Fabric's (fabric.load)."""
    lightning_out = framework_out
    for rank in (0, 1):
        resumed = _load(lightning_out, "resume", rank)
        straight = _load(lightning_out, "straight", rank)
        assert resumed["restored_step"] == 4 and resumed["global_step"] == 8
        assert resumed["files"] == [f"model.ckpt-{s}" for s in (0, 2, 4, 6, 8)]
        assert resumed["weights"].keys() == straight["weights"].keys()
        for key, value in resumed["weights"].items():
            assert torch.equal(value, straight["weights"][key]), key
    shards = sorted(os.listdir(lightning_out / "ckpt" / "model.ckpt-4"))
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # every rank wrote its own
