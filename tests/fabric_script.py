"""Run by tests/test_fabric.py: ``python fabric_script.py OUT MODE`` (Fabric launches 2 ranks).

A plain loop on ``lightning.fabric.Fabric(strategy="ddp", devices=2)`` on CPU under
``MonitoredTrainingSession(fabric=fabric)``. MODE ``first``: rank 1 alone asks to stop at
step 3. MODE ``resume``: a second launch restores with ``fabric.load`` and trains to step 6.
MODE ``uneven``: rank 0's data ends after 3 batches, rank 1 has 6. MODE ``raise``: a hook
raises on rank 1 at step 3. (In these two the step has no collective of its own.) Each rank
saves what it saw to ``OUT/<mode>-rank<r>.pt``.
"""

import os
import sys
import warnings

import torch
import torchmetrics

warnings.filterwarnings("ignore")

from lightning.fabric import Fabric  # noqa: E402

from lightning_finalops import (  # noqa: E402
    FinalOpsHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanTensorHook,
    SessionRunHook,
    StopAtStepHook,
)


class StopOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        fabric = run_context.session.fabric  # hooks find Fabric on the raw session
        if fabric.global_rank == 1 and run_context.session.global_step == 3:
            run_context.request_stop()


class RaiseOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if run_context.session.fabric.global_rank == 1 and run_context.session.global_step == 3:
            raise ValueError("boom on rank 1")


def faulty(out: str, mode: str, fabric) -> None:
    rank = fabric.global_rank
    total = [0.0]

    def step(x):
        total[0] += x
        return {"loss": torch.tensor(total[0])}

    if mode == "uneven":
        hooks, batches = [NanTensorHook("loss")], [1.0] * (3 if rank == 0 else 6)
    else:
        hooks, batches = [RaiseOnRankOne()], [1.0] * 8
    seen = {"error": None}
    try:
        with MonitoredSession(hooks, fabric=fabric) as sess:
            data = iter(batches)
            while not sess.should_stop():
                sess.run(lambda: step(next(data)))
    except Exception as e:  # noqa: BLE001 - recorded: the test checks it
        seen["error"] = (type(e).__name__, str(e))
    seen["global_step"] = sess.global_step
    fabric.barrier()  # the script's own collective after the session
    torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    if mode in ("uneven", "raise"):
        faulty(out, mode, fabric)
        return
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    mean_loss = torchmetrics.MeanMetric()
    final = FinalOpsHook({"mean_loss": mean_loss, "w": lambda: model.weight})
    stop = StopOnRankOne() if mode == "first" else StopAtStepHook(last_step=6)
    seen = {}
    with MonitoredTrainingSession(
        checkpoint_dir=os.path.join(out, "ckpt"), save_checkpoint_steps=2,
        hooks=[stop, final], modules=model, optimizers=optimizer, fabric=fabric,
    ) as sess:
        seen["restored_step"] = sess.global_step
        seen["restored_w"] = model.weight.detach().clone()
        while not sess.should_stop():
            g = torch.Generator().manual_seed(100 * sess.global_step + fabric.global_rank)
            x = torch.randn(4, 3, generator=g)

            def train_step(x=x):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
                fabric.backward(loss)
                optimizer.step()
                mean_loss.update(loss.detach())
                return {"loss": loss}

            sess.run(train_step)
    seen.update(global_step=sess.global_step, final=final.final_ops_values,
                w=model.weight.detach().clone())
    torch.save(seen, os.path.join(out, f"{mode}-rank{fabric.global_rank}.pt"))
    fabric.barrier()


if __name__ == "__main__":
    main()
