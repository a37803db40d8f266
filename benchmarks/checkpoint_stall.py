"""The stall a checkpoint costs the training step: synchronous vs background saves.

What is measured
----------------
One process, a plain loop under ``MonitoredSession``: a two-layer MLP with about ``--mb``
megabytes of float32 parameters (SGD, no momentum: the checkpoint is the parameters), a
batch of 8, ``--steps`` steps. Three variants, interleaved in rounds:

* ``no save``: no ``CheckpointSaverHook``;
* ``sync``: ``CheckpointSaverHook(save_steps=--every)``: the run that saves waits for the
  whole write;
* ``async``: the same with ``async_save=True``: the run that saves waits for a host copy of
  the state; a background thread writes it (on this machine's disk, sharing its cores).

Only the runs are timed (not the session's creation and end, which save in every variant
with a saver). Printed per save: the **stall** (all runs' time minus ``no save``'s, divided
by the saves), split into the wait of the run that saves (its time minus a run's median)
and the slowdown of the other runs (a background write shares the machine's cores with
them). ``bare write`` is one ``torch.save`` of the same state to the same disk, for scale.
The target: an async stall of at most 10% of the sync one.

Run: ``python benchmarks/checkpoint_stall.py [--mb 100] [--steps 40] [--every 10]``
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from lightning_finalops import CheckpointSaverHook, MonitoredSession, StopAtStepHook


def model_of(mb: float) -> nn.Module:
    width = int(math.sqrt(mb * 1e6 / 4 / 2))  # two square layers of float32
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def run_once(variant: str, args: argparse.Namespace, directory: str) -> List[float]:
    """Seconds of each run of one session (creation and end excluded)."""
    model = model_of(args.mb)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    width = model[0].in_features
    x = torch.randn(8, width)
    hooks = [StopAtStepHook(last_step=args.steps)]
    if variant != "no save":
        hooks.append(CheckpointSaverHook(directory, save_steps=args.every, max_to_keep=2,
                                         async_save=variant == "async"))

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    runs: List[float] = []
    with MonitoredSession(hooks, modules=model, optimizers=optimizer) as sess:
        while not sess.should_stop():
            t0 = time.perf_counter()
            sess.run(step)
            runs.append(time.perf_counter() - t0)
    return runs


def bare_write(args: argparse.Namespace, directory: str) -> float:
    model = model_of(args.mb)
    t0 = time.perf_counter()
    torch.save({"modules": {"module": model.state_dict()}}, os.path.join(directory, "bare"))
    return time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="parameter megabytes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="steps between saves")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    variants = ["no save", "sync", "async"]
    spent: Dict[str, List[List[float]]] = {v: [] for v in variants}
    writes: List[float] = []
    saves = args.steps // args.every  # saves inside the runs (creation and end excluded)
    with tempfile.TemporaryDirectory() as directory:
        run_once("no save", argparse.Namespace(**{**vars(args), "steps": 2}), directory)
        for r in range(args.rounds):
            for variant in variants[r % 3:] + variants[:r % 3]:
                spent[variant].append(run_once(variant, args, os.path.join(directory, variant)))
            writes.append(bare_write(args, directory))
    base = statistics.median(sum(runs) for runs in spent["no save"])
    step = statistics.median(t for runs in spent["no save"] for t in runs)
    print(f"torch {torch.__version__}, {args.mb:g} MB of parameters, {args.steps} steps, "
          f"a save every {args.every} ({saves} in the runs), median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"step time without saves: {step * 1e3:.1f} ms")
    print(f"{'variant':<8}{'stall/save':>12}{'saving run waits':>18}{'other runs slow':>17}")
    stalls = {}
    for variant in ("sync", "async"):
        stalls[variant] = (statistics.median(sum(runs) for runs in spent[variant]) - base) / saves
        saving = statistics.median(
            runs[i] - step for runs in spent[variant]
            for i in range(args.every - 1, args.steps, args.every)
        )
        print(f"{variant:<8}{stalls[variant] * 1e3:>9.1f} ms{saving * 1e3:>15.1f} ms"
              f"{(stalls[variant] - saving) * 1e3:>14.1f} ms")
    print(f"bare write (torch.save, same state): {statistics.median(writes) * 1e3:.1f} ms")
    print(f"async stall / sync stall = {stalls['async'] / stalls['sync']:.3f} (target <= 0.10)")


if __name__ == "__main__":
    main()
