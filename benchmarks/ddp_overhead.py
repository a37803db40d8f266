"""Per-step overhead of ``HookCallback`` under ``strategy="ddp"`` (2 CPU processes, gloo).

What is measured
----------------
The same tiny ``Trainer.fit`` (``lightning.pytorch`` on CPU, 2 processes launched by
Lightning's ``ddp`` strategy; a 2-layer MLP 32 -> 64 -> 1, batch 64 per rank, SGD, in-memory
data, no validation) is run with these callback lists:

* ``bare``: no callback.
* ``declares nothing``: ``HookCallback`` with hooks that declare nothing to agree on
  (``StopAtStepHook``, ``FinalOpsHook``, ``LoggingTensorHook(every_n_iter=...)``, 10 no-op
  hooks that declare nothing): the session issues no collective at all.
* ``vote only``: the same hooks plus one that declares a stop and does nothing else: the
  agreement's own cost, one small non-blocking all-reduce per step.
* ``standard hooks``: ``HookCallback`` with ``NanTensorHook`` (a value summed over ranks),
  ``LoggingTensorHook(every_n_secs=...)`` (rank 0's clock), an early-stopping hook (a stop
  and a value) and ``StopAtStepHook``: one small non-blocking vote per step.

Each sample is one whole ``trainer.fit`` on rank 0, timed with ``time.perf_counter_ns`` and
divided by the number of optimizer steps. Variants are interleaved in rounds whose order
rotates, after an unrecorded warm-up round; the table reports each variant's median over
rounds, its inter-quartile range and the ratio of medians against ``bare``.

While ``HookCallback`` handles a training batch, every ``torch.distributed`` collective is
counted on every rank, split into blocking and non-blocking (``async_op=True``) calls: the
script prints the blocking ones per step (target 0) and the non-blocking ones per step (the
agreement's one small all-reduce).

Defaults finish in about a minute on a 2-core CPU (both ranks share the two cores, so the
step times are those of an oversubscribed machine; the ratio is what to read).

Run: ``python benchmarks/ddp_overhead.py [--steps 300] [--rounds 6]``
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional

import lightning.pytorch as lp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_finalops import (
    Agreement,
    FinalOpsHook,
    HookCallback,
    LoggingTensorHook,
    NanTensorHook,
    SessionRunHook,
    StopAtStepHook,
    make_early_stopping_hook,
)

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "barrier", "reduce", "gather",
               "scatter", "all_gather_object", "broadcast_object_list", "reduce_scatter")


class NoOpHook(SessionRunHook):
    def before_run(self, run_context: Any) -> None:
        return None

    def after_run(self, run_context: Any, run_values: Any) -> None:
        pass

    def agreement(self) -> Agreement:
        return Agreement()  # it never stops


class VoteOnlyHook(NoOpHook):
    def agreement(self) -> Agreement:
        return Agreement(stop=True)  # may stop on one rank: the session votes every run


class Model(lp.LightningModule):
    def __init__(self, n_batches: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_batches * 64, 32, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True))

    def training_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.mse_loss(self.net(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64)


class Counts:
    """Every collective issued while HookCallback handles a training batch, on this rank."""

    def __init__(self, variants: List[str]) -> None:
        self.by_variant = {v: [0, 0, 0] for v in variants}  # blocking, non-blocking, batches
        self.variant = variants[0]
        self.inside = False
        for name in COLLECTIVES:
            setattr(dist, name, self._counting(getattr(dist, name)))
        for hook in ("on_train_batch_start", "on_train_batch_end"):
            setattr(HookCallback, hook, self._inside(getattr(HookCallback, hook)))

    def _counting(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.inside:
                self.by_variant[self.variant][1 if kwargs.get("async_op") else 0] += 1
            return fn(*args, **kwargs)
        return wrapper

    def _inside(self, method: Any) -> Any:
        counts = self

        @functools.wraps(method)
        def wrapper(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if method.__name__ == "on_train_batch_end":
                counts.by_variant[counts.variant][2] += 1
            counts.inside = True
            try:
                return method(callback, *args, **kwargs)
            finally:
                counts.inside = False
        return wrapper


def hooks_of(variant: str, steps: int) -> List[SessionRunHook]:
    last = StopAtStepHook(last_step=steps + 1)
    if variant in ("declares nothing", "vote only"):
        return [last, FinalOpsHook({"loss": "loss"}),
                LoggingTensorHook({"loss": "loss"}, every_n_iter=10 * steps),
                *(NoOpHook() for _ in range(10)),
                *([VoteOnlyHook()] if variant == "vote only" else [])]
    return [last, NanTensorHook("loss"),
            LoggingTensorHook({"loss": "loss"}, every_n_secs=3600),
            make_early_stopping_hook(lambda: False, run_every_secs=None,
                                     run_every_steps=10 * steps)]


def fit_once(variant: str, steps: int, counts: Counts) -> int:
    counts.variant = variant
    callbacks: List[Any] = []
    if variant != "bare":
        callbacks.append(HookCallback(training_hooks=hooks_of(variant, steps)))
    torch.manual_seed(0)
    model = Model(n_batches=steps)
    trainer = lp.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        callbacks=callbacks,
    )
    t0 = time.perf_counter_ns()
    trainer.fit(model)
    return time.perf_counter_ns() - t0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=6, help="recorded rounds")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    variants = ["bare", "declares nothing", "vote only", "standard hooks"]
    counts = Counts(variants)
    samples: Dict[str, List[float]] = {v: [] for v in variants}
    fit_once("bare", 5, counts)  # launches the second process and warms up
    for r in range(args.rounds + 1):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            ns = fit_once(variant, args.steps, counts)
            if r > 0:
                samples[variant].append(ns / args.steps / 1e3)
    rank = dist.get_rank()
    totals = torch.tensor([counts.by_variant[v] for v in variants[1:]], dtype=torch.float64)
    per_rank = [torch.zeros_like(totals) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, totals)
    if rank == 0:
        bare = statistics.median(samples["bare"])
        print(f"torch {torch.__version__}, lightning {lp.__version__}, 2 CPU processes (gloo), "
              f"{args.steps} steps/fit x {args.rounds} rounds (+1 warm-up)")
        print(f"{'variant':<18}{'median us/step':>16}{'IQR us/step':>22}{'ratio':>8}")
        for variant in variants:
            q1, q2, q3 = statistics.quantiles(samples[variant], n=4, method="inclusive")
            print(f"{variant:<18}{q2:>16.1f}{f'{q1:.1f}-{q3:.1f}':>22}{q2 / bare:>8.3f}")
        for r, rows in enumerate(t.tolist() for t in per_rank):
            for variant, (blocking, non_blocking, batches) in zip(variants[1:], rows):
                print(f"rank {r}, {variant}: {int(batches)} training batches; collectives per "
                      f"step from HookCallback: blocking {blocking / batches:.3f} (target 0), "
                      f"non-blocking {non_blocking / batches:.3f}")
    dist.destroy_process_group()
    os._exit(0)  # the second process's interpreter teardown must not outlive rank 0's


if __name__ == "__main__":
    main()
