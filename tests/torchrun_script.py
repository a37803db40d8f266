"""Run by tests/test_torchrun.py under the real launcher:
``python -m torch.distributed.run --standalone --nproc_per_node=2 torchrun_script.py OUT MODE``.

A plain training loop (DDP-wrapped ``Linear`` on gloo) under ``MonitoredTrainingSession``
with a ``CheckpointSaverHook`` every 2 steps and a ``FinalOpsHook`` over a torchmetrics mean
of the loss. MODE ``first``: rank 1 alone asks to stop at step 3. MODE ``resume``: a second
launch restores from the checkpoints and trains to step 6. Each rank saves what it saw to
``OUT/<mode>-rank<r>.pt``, including how many checkpoint files it wrote itself. MODE
``evaluate``: an ``InMemoryEvaluatorHook`` whose ranks evaluate shards of different sizes
(3 batches and 1) into a torchmetrics mean, and a ``stop_if_no_decrease_hook`` on its history.
"""

import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torchmetrics

warnings.filterwarnings("ignore")

from lightning_finalops import (  # noqa: E402
    FinalOpsHook,
    InMemoryEvaluatorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    SessionRunHook,
    StopAtStepHook,
    stop_if_no_decrease_hook,
)


class StopOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if dist.get_rank() == 1 and run_context.session.global_step == 3:
            run_context.request_stop()


def evaluate(out: str, rank: int) -> None:
    """Every rank evaluates its shard; the metric reduces, so every rank sees the same."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    eval_x = torch.randn(8, 3, generator=torch.Generator().manual_seed(7))
    shards = {0: [eval_x[0:2], eval_x[2:4], eval_x[4:6]], 1: [eval_x[6:8]]}
    eval_mse = torchmetrics.MeanMetric()

    def eval_step(x):
        eval_mse.update((net(x) - x.sum(1, keepdim=True)).pow(2).reshape(-1))

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: shards[rank], every_n_iter=2,
                                      hooks=[FinalOpsHook({"mse": eval_mse})])
    stopper = stop_if_no_decrease_hook(evaluator, "mse", 2, run_every_secs=None,
                                       run_every_steps=1)
    with MonitoredSession([evaluator, stopper, StopAtStepHook(last_step=40)],
                          modules=net) as sess:
        while not sess.should_stop():
            g = torch.Generator().manual_seed(100 * sess.global_step + rank)
            x = torch.randn(4, 3, generator=g)
            # a learning rate that overshoots from step 4 on: the mse stops decreasing
            lr = 0.05 if sess.global_step < 4 else 1.5

            def train_step(x=x, ddp=ddp, lr=lr):
                optimizer.zero_grad()
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = torch.nn.functional.mse_loss(ddp(x), x.sum(1, keepdim=True))
                loss.backward()
                optimizer.step()

            sess.run(train_step)
    # the mean of all 8 samples' squared errors, by hand on the final weights
    with torch.no_grad():
        by_hand = (net(eval_x) - eval_x.sum(1, keepdim=True)).pow(2).mean()
    torch.save({
        "global_step": sess.global_step, "stopped": stopper.stopped,
        "history": [(step, float(v["mse"])) for step, v in evaluator.evaluation_history],
        "by_hand": float(by_hand),
    }, os.path.join(out, f"evaluate-rank{rank}.pt"))
    # DDP's reducer goes before the process group it uses: the last step function (its
    # default argument) and the session (its last run's context holds the step) still
    # reference the DDP module; freed at interpreter exit, after destroy_process_group(),
    # the reducer aborts the process now and then ("terminate called without an active
    # exception")
    del ddp, train_step, sess
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "evaluate":
        evaluate(out, rank)
        return
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
    # DDP's reducer goes before the process group it uses: the last step function (its
    # default argument) and the session (its last run's context holds the step) still
    # reference the DDP module; freed at interpreter exit, after destroy_process_group(),
    # the reducer aborts the process now and then ("terminate called without an active
    # exception")
    del ddp, train_step, sess
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
