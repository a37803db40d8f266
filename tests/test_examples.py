"""The examples run and print what the README says (each is a subprocess, as a user runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(*args: str, cwd: str = ROOT) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_plain_loop_prints_the_final_values() -> None:
    out = run("examples/plain_loop.py")
    assert "stopped at global step 400" in out
    for name in ("mean_loss", "last_loss", "w_norm", "bias"):
        assert f"{name}: [" in out


def test_train_lightning_prints_a_table_per_evaluation() -> None:
    out = run("examples/train_lightning.py", "--epochs", "2", "--samples", "1024")
    lines = [line.split() for line in out.splitlines()]
    assert ["session", "step", "val_acc", "val_loss", "val_ce", "weight_norm"] in lines
    rows = [line for line in lines if line[:1] == ["validation"]]
    assert [row[1] for row in rows] == ["16", "32"]
    assert any(line[:3] == ["end", "of", "fit"] for line in lines)
    assert 0.5 < float(rows[-1][2]) <= 1.0  # an accuracy


def test_estimator_migration_runs_train_evaluate_predict() -> None:
    out = run("examples/estimator_migration.py")
    assert "evaluate at step" in out and "predicted 100 rows" in out


@pytest.mark.parametrize("config", ["examples/cli/config.yaml"])
def test_cli_example_runs_from_its_yaml(config: str) -> None:
    pytest.importorskip("jsonargparse")
    out = run("examples/cli/train_cli.py", "fit", "--config", config, "--trainer.max_epochs=1")
    assert "val_ce=" in out and "train_loss=" in out


def test_ddp_example_prints_the_same_values_on_both_ranks() -> None:
    out = run("ddp.py", cwd=EXAMPLES)
    rows = sorted(line for line in out.splitlines() if line.startswith("rank "))
    rank0 = [r.split(" ", 2)[2] for r in rows if r.startswith("rank 0")]
    rank1 = [r.split(" ", 2)[2] for r in rows if r.startswith("rank 1")]
    assert rank0 and rank0 == rank1


def test_torchrun_loop_runs_two_ranks_that_agree_and_resumes(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "examples/torchrun_loop.py", "--checkpoint-dir", ckpt]
    first = run(*launch, "--steps", "20")
    finals = dict(re.findall(r"rank (\d): steps 0 -> 20, final values (\{[^}]*\})", first))
    assert sorted(finals) == ["0", "1"], first
    assert finals["0"] == finals["1"]  # the same values on both ranks
    again = run(*launch, "--steps", "30")
    assert "rank 0: steps 20 -> 30," in again and "rank 1: steps 20 -> 30," in again


def test_fabric_loop_runs_two_ranks_that_agree_and_resumes(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = run("examples/fabric_loop.py", "--checkpoint-dir", ckpt, "--steps", "20")
    finals = dict(re.findall(r"rank (\d): steps 0 -> 20, final values (\{[^}]*\})", first))
    assert sorted(finals) == ["0", "1"], first
    assert finals["0"] == finals["1"]
    again = run("examples/fabric_loop.py", "--checkpoint-dir", ckpt, "--steps", "30")
    assert "rank 0: steps 20 -> 30," in again and "rank 1: steps 20 -> 30," in again
