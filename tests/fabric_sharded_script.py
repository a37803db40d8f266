"""Run by tests/test_sharded_checkpoints.py: ``python fabric_sharded_script.py OUT MODE``.

``MonitoredTrainingSession(fabric=...)`` on Fabric's ``ModelParallelStrategy`` (FSDP2's
``fully_shard`` in its ``parallelize_fn``), 2 CPU processes (gloo), SGD with momentum, data
by step and rank; ``fabric.save`` writes a directory from every rank, the library commits
it by one rename. MODE ``first`` trains to step 4, ``resume`` restores (``fabric.load``) and
trains to 8, ``straight`` trains to 8 uninterrupted. Each rank saves its full weights to
``OUT/<mode>-rank<r>.pt``.
"""

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_finalops import MonitoredTrainingSession, StopAtStepHook  # noqa: E402


def parallelize(model, mesh):
    for layer in model:
        fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    fabric = Fabric(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(
        parallelize_fn=parallelize, data_parallel_size=2, tensor_parallel_size=1))
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)))
    optimizer = fabric.setup_optimizers(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    directory = os.path.join(out, "straight" if mode == "straight" else "ckpt")
    with MonitoredTrainingSession(
        checkpoint_dir=directory, save_checkpoint_steps=2, modules=model, optimizers=optimizer,
        hooks=[StopAtStepHook(last_step=4 if mode == "first" else 8)], fabric=fabric,
    ) as sess:
        restored = sess.global_step
        while not sess.should_stop():
            g = torch.Generator().manual_seed(100 * sess.global_step + fabric.global_rank)
            x = torch.randn(2, 4, generator=g)

            def step(x=x):
                optimizer.zero_grad()
                fabric.backward(model(x).square().mean())
                optimizer.step()

            sess.run(step)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    torch.save({"restored_step": restored, "global_step": sess.global_step, "weights": weights,
                "files": sorted(os.listdir(directory))},
               os.path.join(out, f"{mode}-rank{fabric.global_rank}.pt"))
    fabric.barrier()
    torch.distributed.destroy_process_group()  # avoids gloo's abort at interpreter exit


if __name__ == "__main__":
    main()
