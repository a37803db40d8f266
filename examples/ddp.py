"""HookCallback under ``strategy="ddp"``: 2 CPU processes (gloo), the same final values on both.

torchmetrics' ``compute()`` reduces across ranks, so the FinalOpsHook values are global and
identical on every rank. ``strategy="ddp"`` re-runs this script for rank 1, so it must stay
import-safe (``if __name__ == "__main__":``).

Run: ``python examples/ddp.py`` (about 10 s on a 2-core CPU).
"""

from __future__ import annotations

import sys
import warnings

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader
from train_lightning import Classifier, synthetic_data

from lightning_finalops import HookCallback, to_host


def main() -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = Classifier(hidden=32)
    collect = HookCallback(final_ops={"val_acc": model.val_acc, "val_loss": model.val_loss})
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, callbacks=[collect],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(
        model,
        DataLoader(synthetic_data(2048, seed=1), batch_size=64, shuffle=True),
        DataLoader(synthetic_data(1024, seed=2), batch_size=128),
    )
    lines = []
    for step, values in collect.final_ops_hook.final_ops_history:
        host = to_host(values)
        lines.append(f"rank {trainer.global_rank} step {step:3d}: "
                     + "  ".join(f"{k}={v.item():.4f}" for k, v in host.items()) + "\n")
    sys.stdout.write("".join(lines))  # one write per rank: the two ranks share stdout
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()  # a clean exit for gloo


if __name__ == "__main__":
    main()
