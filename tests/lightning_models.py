"""Tiny LightningModules for either package (``pytorch_lightning`` or ``lightning.pytorch``)."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def pl_package(name: str = "pytorch_lightning") -> Any:
    return importlib.import_module(name)


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class ResumableBatches:
    """Batches Lightning can resume mid-epoch (its loops save and load a loader's state):
    its state is its position."""

    def __init__(self, batches: list) -> None:
        self.batches = list(batches)
        self.start = self.pos = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.pos, self.start = self.start, 0
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["pos"]


class DictDataset(Dataset):
    """Yields ``{"x": ..., "y": ...}`` so str feeds can be set on the batch."""

    def __init__(self, n: int, seed: int) -> None:
        self.inner = dataset(n, seed)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        x, y = self.inner[i]
        return {"x": x, "y": y}


def make_module_class(package: str = "pytorch_lightning") -> type:
    pl = pl_package(package)

    class TinyModule(pl.LightningModule):
        """4 train batches, 2 val, 2 test, 2 predict batches (batch_size=2) by default."""

        def __init__(self, n_train: int = 8, n_val: int = 4, dict_batches: bool = False,
                     lr: float = 0.05, batch_size: int = 2) -> None:
            super().__init__()
            import torchmetrics

            self.layer = nn.Linear(4, 1)
            self.n_train, self.n_val, self.dict_batches, self.lr = n_train, n_val, dict_batches, lr
            self.val_mean_loss = torchmetrics.MeanMetric()
            # per-sample errors: the same value however the data is split across ranks
            self.val_sample_mse = torchmetrics.MeanMetric()
            self.batch_size = batch_size
            self.seen_scale: list = []

        def _split(self, batch: Any):
            if isinstance(batch, dict):
                self.seen_scale.append(batch.get("scale"))
                return batch["x"], batch["y"]
            return batch[0], batch[1]

        def training_step(self, batch: Any, batch_idx: int):
            x, y = self._split(batch)
            loss = F.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return {"loss": loss, "x_sum": x.sum().detach()}

        def validation_step(self, batch: Any, batch_idx: int):
            x, y = self._split(batch)
            loss = F.mse_loss(self.layer(x), y)
            self.val_mean_loss.update(loss)
            self.val_sample_mse.update((self.layer(x) - y).pow(2).reshape(-1))
            self.log("val_loss", loss)
            return {"val_loss": loss}

        def on_validation_epoch_start(self) -> None:
            self.val_mean_loss.reset()
            self.val_sample_mse.reset()

        def test_step(self, batch: Any, batch_idx: int):
            x, y = self._split(batch)
            loss = F.mse_loss(self.layer(x), y)
            self.log("test_loss", loss)
            return {"test_loss": loss}

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
            x, _ = self._split(batch)
            return {"prediction": self.layer(x)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def _loader(self, n: int, seed: int) -> DataLoader:
            data = DictDataset(n, seed) if self.dict_batches else dataset(n, seed)
            return DataLoader(data, batch_size=self.batch_size)

        def train_dataloader(self) -> DataLoader:
            return self._loader(self.n_train, 0)

        def val_dataloader(self) -> DataLoader:
            return self._loader(self.n_val, 1)

        def test_dataloader(self) -> DataLoader:
            return self._loader(4, 2)

        def predict_dataloader(self) -> DataLoader:
            return self._loader(4, 3)

    return TinyModule


def make_trainer(package: str = "pytorch_lightning", **kwargs: Any) -> Any:
    pl = pl_package(package)
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


# Module-level classes, so ddp_spawn can pickle them into its worker processes.
TinyModulePL = make_module_class("pytorch_lightning")
TinyModulePL.__qualname__ = TinyModulePL.__name__ = "TinyModulePL"
TinyModulePL.__module__ = __name__
