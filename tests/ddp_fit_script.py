"""Run by tests/test_lightning_ddp.py: ``python ddp_fit_script.py OUT_DIR MODE``.

MODE ``ddp`` fits with strategy="ddp" on 2 CPU processes (gloo), 2 samples per rank and step;
MODE ``single`` fits in one process with 4 samples per step: the same data per step. Each
process saves its hooks' results to OUT_DIR/<mode>-rank<r>.pt.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

from lightning_models import DictDataset, dataset, make_module_class, make_trainer  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_finalops import (  # noqa: E402
    CheckpointSaverHook,
    FinalOpsHook,
    HookCallback,
    SessionRunHook,
)


class StopOnRankOne(SessionRunHook):
    """Requests a stop on rank 1 only (the single process plays rank 1): ranks must agree."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_run(self, run_context, run_values) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 1
        if rank == 1 and run_context.session.global_step >= self.step:
            run_context.request_stop()


class InOrder(make_module_class()):
    """Splits the data across ranks in order (Lightning's own sampler shuffles training data),
    so that step k of the 2 ranks together sees the samples step k of one process sees."""

    def _loader(self, n: int, seed: int) -> DataLoader:
        data = DictDataset(n, seed) if self.dict_batches else dataset(n, seed)
        sampler = DistributedSampler(data, shuffle=False) if dist.is_initialized() else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    ddp = mode == "ddp"
    model = InOrder(n_train=16, n_val=8, batch_size=2 if ddp else 4)
    final = FinalOpsHook({"mse": model.val_sample_mse, "w": model.layer.weight})
    training_final = FinalOpsHook({"w": model.layer.weight, "b": lambda: model.layer.bias})
    callback = HookCallback(
        training_hooks=[
            # The request reaches the other rank with the run's vote, so under DDP every rank
            # stops one run after it: asked at 5 on two ranks, at 6 in one process.
            StopOnRankOne(step=5 if ddp else 6),
            training_final,
            # every rank calls trainer.save_checkpoint (a collective), rank 0 writes
            CheckpointSaverHook(os.path.join(out_dir, f"ckpt-{mode}"), save_steps=2),
        ],
        evaluation_hooks=[final],
    )
    kwargs = dict(strategy="ddp", devices=2, use_distributed_sampler=False) if ddp else {}
    trainer = make_trainer(max_epochs=3, callbacks=[callback], **kwargs)
    trainer.fit(model)
    rank = trainer.global_rank
    torch.save(
        {
            "evaluations": final.final_ops_history,
            "training": training_final.final_ops_history,
            "global_step": trainer.global_step,
        },
        os.path.join(out_dir, f"{mode}-rank{rank}.pt"),
    )
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # avoids gloo's abort at interpreter exit


if __name__ == "__main__":
    main()
