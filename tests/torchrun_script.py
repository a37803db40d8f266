"""Run by tests/test_torchrun.py under the real launcher:
``python -m torch.distributed.run --standalone --nproc_per_node=2 torchrun_script.py OUT MODE``.

A plain training loop (DDP-wrapped ``Linear`` on gloo) under ``MonitoredTrainingSession``
with a ``CheckpointSaverHook`` every 2 steps and a ``FinalOpsHook`` over a torchmetrics mean
of the loss. MODE ``first``: rank 1 alone asks to stop at step 3. MODE ``resume``: a second
launch restores from the checkpoints and trains to step 6. Each rank saves what it saw to
``OUT/<mode>-rank<r>.pt``, including how many checkpoint files it wrote itself.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torchmetrics

warnings.filterwarnings("ignore")

from lightning_finalops import (  # noqa: E402
    FinalOpsHook,
    MonitoredSession,
    MonitoredTrainingSession,
    SessionRunHook,
    StopAtStepHook,
)


class StopOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if dist.get_rank() == 1 and run_context.session.global_step == 3:
            run_context.request_stop()


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writes = [0]
    real_save = torch.save

    def counting_save(obj, f, *args, **kwargs):
        writes[0] += 1
        return real_save(obj, f, *args, **kwargs)

    torch.save = counting_save
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    mean_loss = torchmetrics.MeanMetric()
    final = FinalOpsHook({"mean_loss": mean_loss, "w": lambda: net.weight})
    stop = StopOnRankOne() if mode == "first" else StopAtStepHook(last_step=6)
    seen = {}
    with MonitoredTrainingSession(
        checkpoint_dir=os.path.join(out, "ckpt"), save_checkpoint_steps=2,
        hooks=[stop, final], modules=net, optimizers=optimizer,
    ) as sess:
        seen["restored_step"] = sess.global_step
        seen["restored_w"] = net.weight.detach().clone()
        while not sess.should_stop():
            step = sess.global_step
            g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data
            x = torch.randn(4, 3, generator=g)

            def train_step(x=x, ddp=ddp):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(ddp(x), x.sum(1, keepdim=True))
                loss.backward()
                optimizer.step()
                mean_loss.update(loss.detach())
                return {"loss": loss}

            sess.run(train_step)
    torch.save = real_save
    if rank == 0:  # a session of this process alone, after training: no other rank joins it
        alone = FinalOpsHook({"w": lambda: net.weight})
        with MonitoredSession([alone], across_ranks=False) as solo:
            solo.run(lambda: None)
        seen["alone"] = alone.final_ops_values["w"]
    try:
        MonitoredTrainingSession(chief_only_hooks=[StopAtStepHook(last_step=1)])
    except ValueError as e:
        seen["chief_only_stop"] = str(e)
    seen.update(global_step=sess.global_step, final=final.final_ops_values, writes=writes[0],
                w=net.weight.detach().clone())
    torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))
    del ddp  # DDP's reducer goes before the process group it uses
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
