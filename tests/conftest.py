"""Shared fixtures: tiny models and synthetic data that train in milliseconds on a CPU."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import List

import pytest
import torch

from lightning_finalops import SessionRunHook


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_clock():
    """Each test starts and ends with no agreed time (a session a test left open keeps one)."""
    from lightning_finalops import distributed

    distributed.set_agreed_time(None)
    yield
    distributed.set_agreed_time(None)


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_batches(n: int = 8, batch_size: int = 4, features: int = 3, seed: int = 0):
    """A list of ``(x, y)`` batches of a noiseless linear problem."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, features, generator=g)
        out.append((x, x @ w))
    return out


_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def requires_cuda(test):
    """Mark ``test`` ``gpu`` (``benchmarks/gpu_check.py`` runs those); skip it without CUDA."""
    return pytest.mark.gpu(_no_cuda(test))


class Counter(SessionRunHook):
    """A stateful hook: counts its runs, across restarts through its state."""

    def __init__(self, runs: int = 0, name: str = "") -> None:
        self.runs = runs
        self.name = name
        self.seen_at_creation: List[int] = []

    @property
    def state_key(self) -> str:
        return f"Counter[{self.name}]" if self.name else "Counter"

    def after_create_session(self, session, coord) -> None:
        self.seen_at_creation.append(session.global_step)

    def after_run(self, run_context, run_values) -> None:
        self.runs += 1

    def state_dict(self):
        return {"runs": self.runs}

    def load_state_dict(self, state_dict) -> None:
        self.runs = state_dict["runs"]


def run_launch(script: str, *args: str, timeout: float = 180) -> None:
    """Run ``python script args...`` (which launches its own ranks) and fail if it hangs.

    ``script`` may be ``-m`` and a module, with its arguments after it. The launch runs in a
    process group of its own, so a hang kills every rank it started, not only the first: a
    test fails instead of blocking CI.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, script, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{os.path.basename(script)} {' '.join(args)} hung for {timeout} s:\n"
                    + output[-3000:])
    assert proc.returncode == 0, output[-5000:]
