"""The main demo: a real ``Trainer.fit`` whose final metric values FinalOpsHook collects.

A small MLP learns a synthetic two-class problem. torchmetrics metrics are updated in every
validation step; one ``HookCallback(final_ops=...)`` reads their final values at the end of
every validation and at the end of ``fit`` (on the GPU when training there, without a host
synchronisation per step), and the script prints them as a table.

Run: ``python examples/train_lightning.py`` (about 15 s on a laptop CPU).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_finalops import HookCallback, to_host


def synthetic_data(n: int, seed: int) -> TensorDataset:
    """Two classes separated by a fixed random hyperplane, with 10% label noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    direction = torch.randn(20, generator=torch.Generator().manual_seed(1234))
    y = (x @ direction > 0).long()
    flip = torch.rand(n, generator=g) < 0.1
    return TensorDataset(x, torch.where(flip, 1 - y, y))


class Classifier(pl.LightningModule):
    """A 2-layer MLP with validation metrics kept as torchmetrics objects."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.lr = lr
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=2)
        self.val_loss = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_acc.reset()
        self.val_loss.reset()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc.update(logits, y)
        self.val_loss.update(loss)
        self.log("val_ce", loss)  # an epoch mean, also reachable by name

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    pl.seed_everything(0, verbose=False)
    model = Classifier()
    train = DataLoader(synthetic_data(args.samples, seed=1), batch_size=64, shuffle=True)
    val = DataLoader(synthetic_data(2048, seed=2), batch_size=256)

    # The one line: these values at the end of every validation and at the end of fit.
    collect = HookCallback(final_ops={
        "val_acc": model.val_acc,                         # a metric: compute()
        "val_loss": model.val_loss,
        "val_ce": "val_ce",                               # a name: trainer.callback_metrics
        "weight_norm": lambda: model.net[0].weight.norm(),  # a callable
    })
    # Lightning's start-up lines (accelerators, tips) are INFO: the demo prints its values only
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, callbacks=[collect],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val)

    history = collect.final_ops_hook.final_ops_history
    sessions = ["validation"] * (len(history) - 1) + ["end of fit"]
    names = list(history[0][1])
    print(f"\n{'session':<12} {'step':>6}  " + "  ".join(f"{n:>11}" for n in names))
    for session, (step, values) in zip(sessions, history):
        host = to_host(values)  # one transfer for the whole structure, not one .item() each
        print(f"{session:<12} {step:>6}  " + "  ".join(f"{host[n].item():>11.4f}" for n in names))
    device = history[-1][1]["val_acc"].device
    print(f"\nfinal values were computed on {device}; "
          f"final val_acc = {to_host(collect.final_ops_hook.final_ops_values)['val_acc']:.4f}")


if __name__ == "__main__":
    main()
