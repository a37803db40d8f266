"""Run by tests/test_sharded_checkpoints.py under ``torch.distributed.run``:
``sharded_script.py OUT MODE``.

A plain loop under ``MonitoredTrainingSession`` over a two-layer model sharded with FSDP2's
``fully_shard`` (gloo, CPU), SGD with momentum, data by step and rank, a checkpoint every
2 steps. Each rank saves what it saw to ``OUT/<mode>-rank<r>.pt``: the restored step, the
final step, and the full (gathered) weights and momentum buffers.

MODE:
    first: train to step 4 in ``OUT/ckpt``.
    resume: relaunch in ``OUT/ckpt`` and train to step 8.
    straight: train to step 8 uninterrupted in ``OUT/straight``.
    restore1 / restore4: restore ``OUT/ckpt1`` (a copy of ``first``'s) on 1 or 4 ranks
        (DCP reshards), as a finished job (its last step is 4: nothing runs or saves).
    kill_first: train to step 8 in ``OUT/killed``; rank 1 is SIGKILLed in the middle of
        the third save (step 4): its shards are not written, rank 0's are.
    kill_resume: relaunch in ``OUT/killed`` and train to step 8.
    async_first / async_resume: ``first`` and ``resume`` with ``async_save=True``, in
        ``OUT/async``.
"""

import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

warnings.filterwarnings("ignore")

from lightning_finalops import (  # noqa: E402
    FinalOpsHook,
    MonitoredTrainingSession,
    StopAtStepHook,
    monitored_session,
)


def build(world: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer


def full(tensor):
    return tensor.full_tensor().detach().clone() if hasattr(tensor, "full_tensor") else tensor


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(world)
    directory = {"first": "ckpt", "resume": "ckpt", "straight": "straight", "restore1": "ckpt1",
                 "restore4": "ckpt1", "kill_first": "killed", "kill_resume": "killed",
                 "async_first": "async", "async_resume": "async"}[mode]
    last = 4 if mode in ("first", "restore1", "restore4", "async_first") else 8
    if mode == "kill_first":
        real_save, saves = monitored_session.dcp.save, [0]

        def save_killed_at_the_third(state, checkpoint_id, **kwargs):
            saves[0] += 1
            if saves[0] == 3 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # rank 0 writes its shards, not rank 1
            return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

        monitored_session.dcp.save = save_killed_at_the_third
    final = FinalOpsHook({"w0": lambda: model[0].weight, "norm": lambda: model[0].weight.norm()})
    seen = {}
    with MonitoredTrainingSession(
        checkpoint_dir=os.path.join(out, directory), save_checkpoint_steps=2,
        hooks=[StopAtStepHook(last_step=last), final], modules=model, optimizers=optimizer,
        async_save=mode.startswith("async"),
    ) as sess:
        seen["restored_step"] = sess.global_step
        seen["restored"] = [full(p) for p in model.parameters()]
        while not sess.should_stop():
            g = torch.Generator().manual_seed(100 * sess.global_step + rank)
            x = torch.randn(4, 8, generator=g)

            def step(x=x):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), x[:, :4])
                loss.backward()
                optimizer.step()

            sess.run(step)
    seen.update(
        global_step=sess.global_step,
        params=[full(p) for p in model.parameters()],
        momentum=[full(optimizer.state[p]["momentum_buffer"]) for p in model.parameters()],
        final=final.final_ops_values,
    )
    torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
