"""Per-step overhead and host syncs of ``MonitoredSession`` on CUDA, with the standard hooks.

What is measured
----------------
For a small MLP (256 -> 1024 -> 1024 -> 10, batch 256) and a mid-size one (4096 -> 4096 x 4
-> 1000, batch 512, bf16 autocast), a plain training loop on CUDA is run bare and under
``MonitoredSession`` with ``FinalOpsHook`` + 10 no-op hooks + the standard hooks doing their
per-run work (``NanTensorHook(non_blocking=True)``, ``StopAtStepHook``, ``LoggingTensorHook``,
``SummarySaverHook`` and ``CheckpointSaverHook`` with periods longer than the run). Each
block of ``--steps`` steps is timed with CUDA events around it (one synchronisation per block,
outside the steps), variants interleaved over ``--rounds`` rounds; the script prints the
median ms/step, the ratio hooked/bare, and the host synchronisations per step that
``audit_syncs`` attributes to anything but the step itself (target 0).

Without CUDA it prints that and exits 0.

Run on a GPU machine: ``python benchmarks/gpu_overhead.py [--steps 200] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from lightning_finalops import (
    CheckpointSaverHook,
    FinalOpsHook,
    LoggingTensorHook,
    MonitoredSession,
    NanTensorHook,
    SessionRunHook,
    StopAtStepHook,
    SummarySaverHook,
    audit_syncs,
)


class NoOpHook(SessionRunHook):
    def before_run(self, run_context: Any) -> None:
        return None

    def after_run(self, run_context: Any, run_values: Any) -> None:
        pass


def workload(name: str) -> Dict[str, Any]:
    if name == "small":
        sizes, batch, autocast = [256, 1024, 1024, 10], 256, False
    else:
        sizes, batch, autocast = [4096, 4096, 4096, 4096, 4096, 1000], 512, True
    layers: List[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, sizes[0], device="cuda")
    y = torch.randint(0, sizes[-1], (batch,), device="cuda")

    def step() -> Dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    return {"model": model, "optimizer": optimizer, "step": step}


def hooks_for(work: Dict[str, Any], steps: int, directory: str) -> List[SessionRunHook]:
    model = work["model"]
    return [
        StopAtStepHook(num_steps=steps),
        NanTensorHook("loss", non_blocking=True),
        LoggingTensorHook(["loss"], every_n_iter=10 * steps),
        SummarySaverHook(save_steps=10 * steps, summary_op={"loss": "loss"}),
        CheckpointSaverHook(directory, save_steps=10 * steps),
        *(NoOpHook() for _ in range(10)),
        FinalOpsHook({"w": lambda: model[0].weight.norm()}),
    ]


def timed(block: Any) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    block()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def measure(name: str, steps: int, rounds: int, directory: str) -> None:
    work = workload(name)
    step = work["step"]

    def bare() -> None:
        for _ in range(steps):
            step()

    def hooked() -> None:
        with MonitoredSession(hooks_for(work, steps, directory), modules=work["model"]) as sess:
            while not sess.should_stop():
                sess.run(step)

    bare(), hooked()  # warm-up
    samples: Dict[str, List[float]] = {"bare": [], "hooked": []}
    for r in range(rounds):
        for variant in (["bare", "hooked"] if r % 2 == 0 else ["hooked", "bare"]):
            samples[variant].append(timed(bare if variant == "bare" else hooked) / steps)
    with audit_syncs(log=False) as audit:
        hooked()
    ours = sum(n for (who, _), n in audit.counts.items() if who != "user code")
    b, h = statistics.median(samples["bare"]), statistics.median(samples["hooked"])
    print(f"{name}: bare {b:.3f} ms/step, hooked {h:.3f} ms/step, ratio {h / b:.3f}; "
          f"syncs outside the step: {ours} in {steps} steps ({ours / steps:.3f}/step)")
    print(audit.table())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to measure.")
        return
    directory = tempfile.mkdtemp()
    for name in ("small", "mid"):
        measure(name, args.steps, args.rounds, directory)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
