"""Per-step overhead of ``HookCallback`` in ``Trainer.fit``, beside plain Lightning callbacks.

What is measured
----------------
The same tiny ``Trainer.fit`` (``lightning.pytorch`` on CPU; a 2-layer MLP 32 -> 64 -> 1,
batch 64, SGD; pre-batched in-memory data, so the loader does no collation; ``--steps``
optimizer steps over epochs of ``--batches-per-epoch`` batches, each epoch followed by a
validation of ``--val-batches`` batches that update a ``torchmetrics.MeanMetric``) is run with
four callback lists:

* ``bare``: no callback. The model computes the final values itself at the end of every
  validation (``LightningModule.on_validation_end``: the metric's ``compute()`` and the weight
  norm), the hand-written alternative to the ``FinalOpsHook`` below, so that every variant
  does the same work for the user; so do the plain-callback variants.
* ``HookCallback``: ``HookCallback(training_hooks=[10 no-op hooks],
  evaluation_hooks=[FinalOpsHook({"val_loss": model.val_loss, "weight_norm": callable})])``.
  The no-op hooks are ``SessionRunHook`` subclasses overriding ``begin``,
  ``after_create_session``, ``before_run``, ``after_run`` and ``end`` with empty bodies.
* ``10 plain callbacks``: ten ``lightning.pytorch.Callback`` subclasses whose
  ``on_train_batch_start``/``on_train_batch_end`` are ``pass``.
* ``1 plain callback``: one of those.

``--decompose`` adds two variants that split ``HookCallback``'s cost: ``HookCallback(name=)``
(the same hooks with ``name="bench"``, which makes ``HookCallback.state_key`` a constant
string; Lightning reads every callback's ``state_key`` at every callback hook it calls, to
name a profiler action) and ``HookCallback(), no hooks`` (named, no hooks: Lightning's
dispatch of one callback; the model computes the final values by hand, as in ``bare``).

Each sample is one whole ``trainer.fit`` timed with ``time.perf_counter_ns`` and divided by
the number of optimizer steps, subtracting nothing: no timing callback is added to any variant
(a callback of its own would add to the very cost being measured). The model, trainer and
callbacks are built before the timer starts, with the same seed for every variant. Variants
are interleaved in rounds (ABCD, BCDA, ... : the order rotates every round) after an unrecorded
warm-up round; the table reports each variant's median over rounds, its inter-quartile range,
and the ratio of medians against ``bare`` (and the median of the per-round paired ratios).

Because whole fits are timed, ``fit``'s fixed cost (setup, loop construction, teardown) is in
every per-step figure; the script prints it (a bare fit of one step) so the dilution of the
ratios can be judged. Reference figures on this project's 2-core CPU: 10 plain callbacks
1.22-1.24x, one plain callback 1.02-1.04x. Target for ``HookCallback``: <= 1.03x, about what one
empty callback costs.

Defaults finish in about 45 s on a 2-core CPU (about 65 s with ``--decompose``);
``--rounds``/``--steps`` trade time for precision. ``torch.set_num_threads(1)`` keeps step
times stable on a small CPU.

Run: ``python benchmarks/lightning_overhead.py [--steps 1000] [--rounds 12] [--decompose]``
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning.pytorch as lp
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader

from lightning_finalops import FinalOpsHook, HookCallback, SessionRunHook

N_NOOP = 10
TARGET_RATIO = 1.03


class NoOpHook(SessionRunHook):
    """Overrides every session method with an empty body, so the runner calls each one."""

    def begin(self) -> None:
        pass

    def after_create_session(self, session: Any, coord: Any) -> None:
        pass

    def before_run(self, run_context: Any) -> None:
        pass

    def after_run(self, run_context: Any, run_values: Any) -> None:
        pass

    def end(self, session: Any) -> None:
        pass


class NoOpCallback(lp.Callback):
    """A plain Lightning callback doing nothing at every training batch."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        pass

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pass


class TinyModel(lp.LightningModule):
    """The benchmark's model; with ``final_values_by_hand`` it computes the final values itself.

    ``final_values_by_hand`` is what a user without ``FinalOpsHook`` writes: the same values
    the hook reads, computed in ``on_validation_end`` (a module hook, which Lightning calls
    whether or not it is overridden).
    """

    def __init__(self, final_values_by_hand: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        self.val_loss = torchmetrics.MeanMetric()
        self.final_values_by_hand = final_values_by_hand
        self.final_values: Dict[str, torch.Tensor] = {}

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()

    def validation_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(F.mse_loss(self.net(x), y))

    def on_validation_end(self) -> None:
        if self.final_values_by_hand:
            self.final_values = {"val_loss": self.val_loss.compute(),
                                 "weight_norm": self.weight_norm()}

    def weight_norm(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in self.parameters()])
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_batches(n: int, batch_size: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 1, generator=g)
    batches = []
    for _ in range(n):
        x = torch.randn(batch_size, 32, generator=g)
        batches.append((x, x @ w + 0.1 * torch.randn(batch_size, 1, generator=g)))
    return batches


def build_callbacks(variant: str, model: TinyModel) -> List[Any]:
    if variant == "bare":
        return []
    if variant in ("HookCallback", "HookCallback(name=)"):
        final_ops = FinalOpsHook({"val_loss": model.val_loss, "weight_norm": model.weight_norm})
        name = "bench" if variant == "HookCallback(name=)" else None
        return [HookCallback(training_hooks=[NoOpHook() for _ in range(N_NOOP)],
                             evaluation_hooks=[final_ops], name=name)]
    if variant == "HookCallback(), no hooks":
        return [HookCallback(name="bench")]
    if variant == "10 plain callbacks":
        return [NoOpCallback() for _ in range(N_NOOP)]
    if variant == "1 plain callback":
        return [NoOpCallback()]
    raise ValueError(variant)


VARIANTS = ("bare", "HookCallback", "10 plain callbacks", "1 plain callback")
DECOMPOSE_VARIANTS = ("HookCallback(name=)", "HookCallback(), no hooks")
FINAL_OPS_VARIANTS = ("HookCallback", "HookCallback(name=)")


def timed_fit(variant: str, steps: int, train: DataLoader, val: DataLoader,
              val_batches: int) -> int:
    """Build everything for one fit, then time ``trainer.fit`` alone; returns ns."""
    torch.manual_seed(0)
    # every variant but those with a FinalOpsHook computes the final values by hand
    model = TinyModel(final_values_by_hand=variant not in FINAL_OPS_VARIANTS)
    callbacks = build_callbacks(variant, model)
    trainer = lp.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    gc.collect()
    t0 = time.perf_counter_ns()
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    elapsed = time.perf_counter_ns() - t0
    assert trainer.global_step == steps, (trainer.global_step, steps)
    validated = val_batches > 0 and steps >= len(train)  # an epoch ended: a validation ran
    if variant in FINAL_OPS_VARIANTS and validated:
        hook = callbacks[0].evaluation_hooks[0]
        assert hook.final_ops_history, "the FinalOpsHook never ran"
    elif model.final_values_by_hand and validated:
        assert model.final_values, "the final values were never computed"
    return elapsed


def quartiles(samples: List[float]) -> Tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=12,
                        help="recorded rounds (one fit of each variant per round)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="unrecorded rounds first")
    parser.add_argument("--batches-per-epoch", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=2,
                        help="validation batches after each epoch (limit_val_batches)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--decompose", action="store_true",
                        help="add the HookCallback(name=...) and hookless HookCallback variants")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be >= 2 and --steps >= 1")
    quiet_lightning()
    torch.set_num_threads(args.threads)

    train = DataLoader(make_batches(args.batches_per_epoch, 64, seed=1), batch_size=None)
    val = DataLoader(make_batches(max(args.val_batches, 1), 64, seed=2), batch_size=None)
    variants = VARIANTS + (DECOMPOSE_VARIANTS if args.decompose else ())
    runs: Dict[str, Callable[[], int]] = {
        v: (lambda v=v: timed_fit(v, args.steps, train, val, args.val_batches)) for v in variants
    }

    t_start = time.perf_counter()
    samples: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(args.warmup_rounds + args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            ns = runs[variant]()
            if r >= args.warmup_rounds:
                samples[variant].append(ns / args.steps / 1e3)
    one_step = statistics.median(
        timed_fit("bare", 1, train, val, args.val_batches) / 1e6 for _ in range(3)
    )
    elapsed = time.perf_counter() - t_start

    stats = {v: quartiles(s) for v, s in samples.items()}
    bare = stats["bare"][1]
    print(
        f"lightning {lp.__version__}, "
        f"torch {torch.__version__}, threads={torch.get_num_threads()}; "
        f"{args.steps} steps/fit ({args.batches_per_epoch} batches/epoch, "
        f"{args.val_batches} val batches/epoch) x {args.rounds} rounds "
        f"(+{args.warmup_rounds} warm-up), {elapsed:.1f} s"
    )
    header = (f"{'variant':<25} {'median us/step':>15} {'IQR us/step':>19} "
              f"{'ratio vs bare':>14} {'paired ratio':>13}")
    print(header)
    print("-" * len(header))
    for v in variants:
        q1, q2, q3 = stats[v]
        paired = statistics.median(a / b for a, b in zip(samples[v], samples["bare"]))
        print(f"{v:<25} {q2:>15.1f} {q1:>9.1f}-{q3:<9.1f} {q2 / bare:>14.3f} {paired:>13.3f}")
    print(
        f"fit's fixed cost: a bare fit of 1 step takes {one_step:.1f} ms, i.e. "
        f"{one_step * 1e3 / (bare * args.steps):.0%} of a bare fit of {args.steps} steps; "
        "it is in every per-step figure above (nothing subtracted)."
    )
    hook = stats["HookCallback"][1]
    verdict = "OK" if hook / bare <= TARGET_RATIO else "ABOVE TARGET"
    print(
        f"ratio HookCallback/bare = {hook / bare:.3f} (target <= {TARGET_RATIO:.2f}) {verdict}; "
        f"10 plain callbacks = {stats['10 plain callbacks'][1] / bare:.3f} (ref 1.22-1.24), "
        f"1 plain callback = {stats['1 plain callback'][1] / bare:.3f} (ref 1.02-1.04)"
    )


if __name__ == "__main__":
    main()
