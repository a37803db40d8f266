"""``kill -9`` in the middle of a checkpoint write, in both adapters: nothing lost, nothing left.

Each engine trains the same run twice: once uninterrupted, once killed (SIGKILL) half-way
through writing its third checkpoint and relaunched until it completes. The final weights
are bit-for-bit the uninterrupted ones, the checkpoints are the same files, and no temporary
file of the killed write is left.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_resume_script.py")


def launch(*args: str) -> int:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode in (0, -9), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.returncode


@pytest.mark.parametrize("engine", ["plain", "lightning"])
def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(
    tmp_path, engine
) -> None:
    assert launch(engine, str(tmp_path / "a"), str(tmp_path / "a.pt")) == 0
    assert launch(engine, str(tmp_path / "b"), str(tmp_path / "b.pt"), "3") == -9
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path / "b"))  # half-written
    relaunches = 0
    while launch(engine, str(tmp_path / "b"), str(tmp_path / "b.pt")) != 0:
        relaunches += 1
        assert relaunches < 3
    uninterrupted = torch.load(tmp_path / "a.pt")
    resumed = torch.load(tmp_path / "b.pt")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "a"))
