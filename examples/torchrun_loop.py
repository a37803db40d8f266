"""A TF1-style plain training loop on several processes, launched with torchrun.

    torchrun --nproc_per_node=2 examples/torchrun_loop.py [--checkpoint-dir DIR] [--steps N]

Initialize ``torch.distributed`` before building the session: ``MonitoredTrainingSession``
then sees the ranks. Every rank runs the hooks; a stop requested on any rank ends every
rank at the same global step (one run later); only the chief (rank 0) writes checkpoints
and summaries; a second launch with the same ``--checkpoint-dir`` resumes every rank from the
checkpoint rank 0 chose. Runs in seconds on a CPU (gloo).
"""

import argparse
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torchmetrics

from lightning_finalops import FinalOpsHook, MonitoredTrainingSession, StopAtStepHook, to_host


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default=os.path.join(tempfile.gettempdir(),
                                                                  "torchrun_loop_ckpt"))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # before the session: it agrees over these ranks
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    mean_loss = torchmetrics.MeanMetric()  # its compute() reduces over the ranks
    final = FinalOpsHook({"mean_loss": mean_loss, "w_norm": lambda: net.weight.norm()})
    g = torch.Generator().manual_seed(rank)  # each rank its own shard of data

    def train_step(model=model):
        x = torch.randn(32, 8, generator=g)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        optimizer.step()
        mean_loss.update(loss.detach())
        return {"loss": loss}

    with MonitoredTrainingSession(
        checkpoint_dir=args.checkpoint_dir, save_checkpoint_steps=10,
        hooks=[StopAtStepHook(last_step=args.steps), final],
        modules=net, optimizers=optimizer,
    ) as sess:
        start = sess.global_step
        while not sess.should_stop():
            sess.run(train_step)
    print(f"rank {rank}: steps {start} -> {sess.global_step}, final values "
          f"{ {k: round(float(v), 4) for k, v in to_host(final.final_ops_values).items()} }",
          flush=True)
    # DDP's reducer goes before the process group it uses (train_step's default argument
    # and the session's last run still reference it; freed after destroy_process_group(),
    # the reducer may abort the process at exit)
    del model, train_step, sess
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
