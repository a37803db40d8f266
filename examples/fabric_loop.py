"""A TF1-style plain training loop on Lightning Fabric, 2 CPU processes (``strategy="ddp"``).

    python examples/fabric_loop.py [--checkpoint-dir DIR] [--steps N]

``MonitoredTrainingSession(fabric=fabric)``: checkpoints go through ``fabric.save`` and
``fabric.load`` (every rank calls them, Fabric writes once), a stop requested on any rank
ends every rank at the same global step, and a second run with the same
``--checkpoint-dir`` resumes every rank from the same checkpoint. Runs in seconds on a CPU.
"""

import argparse
import os
import tempfile

import torch
import torchmetrics
from lightning.fabric import Fabric

from lightning_finalops import FinalOpsHook, MonitoredTrainingSession, StopAtStepHook, to_host


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default=os.path.join(tempfile.gettempdir(),
                                                                  "fabric_loop_ckpt"))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    mean_loss = torchmetrics.MeanMetric()  # its compute() reduces over the ranks
    final = FinalOpsHook({"mean_loss": mean_loss, "w_norm": lambda: model.weight.norm()})
    g = torch.Generator().manual_seed(fabric.global_rank)  # each rank its own shard of data

    def train_step():
        x = torch.randn(32, 8, generator=g)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        fabric.backward(loss)
        optimizer.step()
        mean_loss.update(loss.detach())
        return {"loss": loss}

    with MonitoredTrainingSession(
        checkpoint_dir=args.checkpoint_dir, save_checkpoint_steps=10,
        hooks=[StopAtStepHook(last_step=args.steps), final],
        modules=model, optimizers=optimizer, fabric=fabric,
    ) as sess:
        start = sess.global_step
        while not sess.should_stop():
            sess.run(train_step)
    print(f"rank {fabric.global_rank}: steps {start} -> {sess.global_step}, final values "
          f"{ {k: round(float(v), 4) for k, v in to_host(final.final_ops_values).items()} }",
          flush=True)
    fabric.barrier()


if __name__ == "__main__":
    main()
