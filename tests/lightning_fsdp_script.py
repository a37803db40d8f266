"""Run by tests/test_sharded_checkpoints.py: ``python lightning_fsdp_script.py OUT MODE``.

``HookCallback`` + ``CheckpointSaverHook`` under Lightning's ``ModelParallelStrategy``
(FSDP2's ``fully_shard`` in ``configure_model``; Lightning's ``FSDPStrategy`` requires a GPU):
sharded checkpoints, every rank writing its shards into one directory, 2 CPU processes
(gloo), a resumable loader. MODE ``first`` trains to step 4 (checkpoints
every 2 steps), ``resume`` runs ``fit(ckpt_path=<step 4>)`` to step 8, ``straight`` trains
to step 8 uninterrupted. Each rank saves its full weights and steps to
``OUT/<mode>-rank<r>.pt``.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import lightning.pytorch as lp  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lightning_models import ResumableBatches, dataset  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_finalops import CheckpointSaverHook, HookCallback, SessionRunHook  # noqa: E402


class Module(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.layer, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        x, y = dataset(16, 0).tensors
        return ResumableBatches([(x[i:i + 1], y[i:i + 1]) for i in range(rank, 16, 2)])


class Restored(SessionRunHook):
    step = None

    def after_create_session(self, session, coord):
        self.step = session.global_step


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = Module()
    restored = Restored()
    directory = os.path.join(out, "straight" if mode == "straight" else "ckpt")
    callback = HookCallback([restored, CheckpointSaverHook(directory, save_steps=2)])
    trainer = lp.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                                  tensor_parallel_size=1),
        max_steps=4 if mode == "first" else 8, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False, callbacks=[callback],
    )
    ckpt = os.path.join(directory, "model.ckpt-4") if mode == "resume" else None
    trainer.fit(model, ckpt_path=ckpt)
    with torch.no_grad():  # gathered here, where the process group exists
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in model.state_dict().items()}
    torch.save({"restored_step": restored.step, "global_step": trainer.global_step,
                "weights": full, "files": sorted(os.listdir(directory))},
               os.path.join(out, f"{mode}-rank{trainer.global_rank}.pt"))
    dist.destroy_process_group()  # avoids gloo's abort at interpreter exit


if __name__ == "__main__":
    main()
