"""The one-command GPU check: every CUDA test, the sync audit's controls on CUDA, the overhead.

Run on a machine with one CUDA GPU, from the repository root, in the dev install
(``pip install -e ".[dev]"``)::

    python benchmarks/gpu_check.py

It runs, each in its own process and with a time limit (all of it in under 5 minutes on
one GPU):

1. ``pytest -m gpu``: every test that needs CUDA (skipped in CI), among them the sync
   audit's positive controls on CUDA tensors, each cross-checked against torch's own report
   (``torch.cuda.set_sync_debug_mode("warn")``), and the check that an audit of CPU tensors
   never initialises CUDA;
2. ``benchmarks/gpu_overhead.py``: hooked vs bare step time and the host syncs per step
   outside the user's step, for a small and a mid-size model.

It prints the device, each part's output tail and a summary line, and exits non-zero if a
part failed or ran out of time. Without CUDA it says so and exits 0 (CI has no GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name: str, command: List[str], timeout: float) -> Tuple[str, bool, float]:
    """Run one part; print its output's tail; return (name, passed, seconds)."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        output, passed = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as e:
        output = f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {timeout:.0f} s"
        passed = False
    seconds = time.monotonic() - start
    print("\n".join(output.rstrip().splitlines()[-60:]), flush=True)
    return name, passed, seconds


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to check (the GPU tests skip without it).")
        return 0
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} "
          f"| CUDA {torch.version.cuda}", flush=True)
    python = sys.executable
    results = [
        run("CUDA tests and the audit's controls on CUDA",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
             "tests"], timeout=180),
        run("overhead and syncs per step",
            [python, "benchmarks/gpu_overhead.py", "--steps", str(args.steps),
             "--rounds", str(args.rounds)], timeout=110),
    ]
    print("== summary")
    for name, passed, seconds in results:
        print(f"{'PASS' if passed else 'FAIL'}  {name} ({seconds:.0f} s)")
    return 0 if all(passed for _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
