"""Per-step overhead of ``MonitoredSession`` on a tiny plain PyTorch training loop.

What is measured
----------------
One step function -- a 2-layer MLP (32 -> 64 -> 1), batch 64, MSE loss, SGD, a
``torchmetrics.MeanMetric`` of the loss updated in the step, batches pre-generated in memory
and cycled -- is run in three ways:

* ``bare``: ``step()`` called directly in a ``for`` loop; after the block the final values
  (the metric's ``compute()`` and the weight norm) are computed once by hand, as the hook does.
* ``hooked``: ``sess.run(step)`` inside ``with MonitoredSession(hooks, modules=model)``, with
  ``hooks`` = 10 no-op hooks (``SessionRunHook`` subclasses overriding ``begin``,
  ``after_create_session``, ``before_run``, ``after_run`` and ``end`` with empty bodies) plus
  a ``FinalOpsHook`` over ``{"loss_mean": metric, "weight_norm": callable}``.
* ``final_ops_only``: the same session with the ``FinalOpsHook`` alone. It overrides none of
  the per-run methods, so this is the runner's fixed cost per ``run()``; the difference to
  ``hooked`` is the cost of the 20 no-op ``before_run``/``after_run`` calls.

Each timed block is ``--steps`` steps, from the session's construction to its close (so the
hooks' ``begin``/``after_create_session``/``end`` and the final evaluation are included,
spread over the block), timed with ``time.perf_counter_ns``. The variants are interleaved:
every round runs one block of each, in an order rotated from round to round, after
``--warmup-rounds`` rounds that are not recorded. The reported per-step time of a variant is
the median over rounds of ``block time / steps``; the spread is the inter-quartile range of
the same samples.

Reported figures
----------------
* ``ratio hooked/bare``: the headline, target <= 1.03.
* per-hook-call cost: ``(hooked - bare) per step / 22``. The 22 calls per step are
  ``before_run`` + ``after_run`` for each of the 11 hooks, counted as if all were called; the
  runner actually skips the ``FinalOpsHook``'s inherited no-op methods, so this figure also
  carries the runner's fixed cost per ``run()``. The decomposition line separates the two.

``--decompose`` adds two hand-written loops that bound what any runner must cost here:
``floor`` builds ``SessionRunContext(SessionRunArgs(step), None)``, calls the 10 no-op
hooks' ``before_run``, runs ``step()``, builds ``SessionRunValues(None, None, None)`` and
calls their ``after_run``; ``floor+detach`` also detaches every tensor the step returns and
keeps the result until the next step (what the session did before it kept the step's dict
as returned; kept here as the price of that rule).

``--profile`` instead runs one hooked block under ``cProfile`` and prints where the
session's own functions spend their time (cProfile inflates small Python calls several times;
use it for proportions, the timed run for costs).

``torch.set_num_threads(1)`` keeps the step time stable on a small CPU. Defaults finish in
about 25 s on a 2-core CPU; ``--steps``/``--rounds`` trade time for precision.

Run: ``python benchmarks/plain_loop_overhead.py [--steps 300] [--rounds 30]``
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import pstats
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_finalops import (
    FinalOpsHook,
    MonitoredSession,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

N_NOOP_HOOKS = 10
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


class Workload:
    """The model, optimizer, metric and cycled in-memory batches; ``step`` is one training step."""

    def __init__(self, batch_size: int = 64, n_batches: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_mean = torchmetrics.MeanMetric()
        w = torch.randn(32, 1, generator=g)
        batches = []
        for _ in range(n_batches):
            x = torch.randn(batch_size, 32, generator=g)
            batches.append((x, x @ w + 0.1 * torch.randn(batch_size, 1, generator=g)))
        self._batches = itertools.cycle(batches)

    def step(self) -> Dict[str, torch.Tensor]:
        x, y = next(self._batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.loss_mean.update(loss.detach())
        return {"loss": loss}

    def weight_norm(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in self.model.parameters()])
            )

    def final_ops(self) -> Dict[str, Any]:
        return {"loss_mean": self.loss_mean, "weight_norm": self.weight_norm}


def run_bare(work: Workload, steps: int) -> int:
    """One block of the bare loop; returns its duration in ns."""
    step = work.step
    work.loss_mean.reset()
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        step()
    final = {"loss_mean": work.loss_mean.compute(), "weight_norm": work.weight_norm()}
    t1 = time.perf_counter_ns()
    assert torch.isfinite(final["loss_mean"])
    return t1 - t0


def run_hooked(work: Workload, steps: int, n_noop: int) -> int:
    """One block under ``MonitoredSession`` (construction to close); returns ns."""
    step = work.step
    work.loss_mean.reset()
    final_ops = FinalOpsHook(work.final_ops())
    hooks: List[SessionRunHook] = [NoOpHook() for _ in range(n_noop)]
    hooks.append(final_ops)
    t0 = time.perf_counter_ns()
    with MonitoredSession(hooks, modules=work.model) as sess:
        run = sess.run
        for _ in range(steps):
            run(step)
    t1 = time.perf_counter_ns()
    assert torch.isfinite(final_ops.final_ops_values["loss_mean"])
    return t1 - t0


def bare_detach(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every returned tensor detached."""
    return {key: value.detach() for key, value in outputs.items()}


def run_floor(work: Workload, steps: int, n_noop: int,
              detach: Optional[Callable[[Any], Any]]) -> int:
    """One block of the hand-written floor loop (see ``--decompose``); returns ns.

    ``detach`` (:func:`bare_detach`) is applied to what the step returns,
    kept until the next step; ``None``: the result is dropped.
    """
    step = work.step
    work.loss_mean.reset()
    hooks = [NoOpHook() for _ in range(n_noop)]
    before_runs = [hook.before_run for hook in hooks]
    after_runs = [hook.after_run for hook in hooks]
    outputs: Any = None
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        context = SessionRunContext(SessionRunArgs(step), None)  # type: ignore[arg-type]
        for before_run in before_runs:
            before_run(context)
        if detach is not None:
            outputs = detach(step())  # kept until the next step, as the session does
        else:
            step()
        values = SessionRunValues(None, None, None)  # type: ignore[arg-type]
        for after_run in after_runs:
            after_run(context, values)
    final = {"loss_mean": work.loss_mean.compute(), "weight_norm": work.weight_norm()}
    t1 = time.perf_counter_ns()
    assert torch.isfinite(final["loss_mean"]) and (outputs is not None) == (detach is not None)
    return t1 - t0


def quartiles(samples: List[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def measure(steps: int, rounds: int, warmup_rounds: int = 1,
            decompose: bool = False) -> Dict[str, List[float]]:
    """Interleaved blocks of every variant; per-step µs samples, one per recorded round."""
    work = Workload()
    variants: Dict[str, Callable[[], int]] = {
        "bare": lambda: run_bare(work, steps),
        "hooked": lambda: run_hooked(work, steps, N_NOOP_HOOKS),
        "final_ops_only": lambda: run_hooked(work, steps, 0),
    }
    if decompose:
        variants["floor"] = lambda: run_floor(work, steps, N_NOOP_HOOKS, None)
        variants["floor+detach"] = lambda: run_floor(work, steps, N_NOOP_HOOKS, bare_detach)
    names = list(variants)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup_rounds + rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order per round
        for name in order:
            gc.collect()  # untimed; each block starts from the same collector state
            ns = variants[name]()
            if r >= warmup_rounds:
                samples[name].append(ns / steps / 1e3)
    return samples


def profile(steps: int) -> None:
    """One hooked block under cProfile; the library's functions sorted by own time."""
    work = Workload()
    run_hooked(work, steps, N_NOOP_HOOKS)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    run_hooked(work, steps, N_NOOP_HOOKS)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(r"lightning_finalops|contextlib", 25)
    cumulative = {}
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, _, function), (_, ncalls, _, cumtime, _) in entries:
        if (filename.endswith("monitored_session.py") and function == "run") or (
            filename.endswith("plain_loop_overhead.py") and function == "step"
        ):
            key = "run" if function == "run" else "step"
            if ncalls >= steps:
                cumulative[key] = cumtime
    if len(cumulative) == 2:
        per_step = (cumulative["run"] - cumulative["step"]) / steps * 1e6
        print(
            f"under cProfile: MonitoredSession.run minus the step = {per_step:.1f} us per run "
            f"(step itself {cumulative['step'] / steps * 1e6:.1f} us)"
        )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=30, help="recorded rounds (one block "
                        "of each variant per round)")
    parser.add_argument("--warmup-rounds", type=int, default=2, help="unrecorded rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--decompose", action="store_true",
                        help="add the hand-written floor and floor+detach loops")
    parser.add_argument("--profile", action="store_true",
                        help="profile one hooked block with cProfile instead of timing")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be >= 2 and --steps >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.profile:
        profile(args.steps)
        return

    t0 = time.perf_counter()
    samples = measure(args.steps, args.rounds, args.warmup_rounds, args.decompose)
    elapsed = time.perf_counter() - t0

    stats = {name: quartiles(values) for name, values in samples.items()}
    bare = stats["bare"][1]
    hooked = stats["hooked"][1]
    fixed = stats["final_ops_only"][1]
    calls = 2 * (N_NOOP_HOOKS + 1)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{args.steps} steps/block x {args.rounds} rounds "
        f"(+{args.warmup_rounds} warm-up), {elapsed:.1f} s"
    )
    print(f"{'variant':<18} {'median us/step':>15} {'IQR us/step':>17} {'ratio vs bare':>14}")
    for name, (q1, q2, q3) in stats.items():
        print(f"{name:<18} {q2:>15.2f} {q1:>8.2f}-{q3:<8.2f} {q2 / bare:>14.3f}")
    # Per-round paired ratios: both blocks of a round share the machine's state of the moment.
    paired = [h / b for h, b in zip(samples["hooked"], samples["bare"])]
    pq1, pq2, pq3 = quartiles(paired)
    print(f"paired per-round ratio hooked/bare: median {pq2:.3f} (IQR {pq1:.3f}-{pq3:.3f})")
    print(
        f"overhead: {hooked - bare:.2f} us/step; per hook call = {(hooked - bare) / calls:.3f} us "
        f"({calls} before_run/after_run calls per step for 11 hooks)"
    )
    print(
        f"decomposition: runner fixed cost per run() = {fixed - bare:.2f} us "
        f"(final_ops_only - bare); per no-op hook call = "
        f"{(hooked - fixed) / (2 * N_NOOP_HOOKS):.3f} us ((hooked - final_ops_only) / "
        f"{2 * N_NOOP_HOOKS})"
    )
    verdict = "OK" if hooked / bare <= TARGET_RATIO else "ABOVE TARGET"
    print(f"ratio hooked/bare = {hooked / bare:.3f} (target <= {TARGET_RATIO:.2f}) {verdict}")


if __name__ == "__main__":
    main()
