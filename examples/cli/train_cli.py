"""LightningCLI with HookCallback configured from YAML (``config.yaml`` beside this file).

Run: ``python examples/cli/train_cli.py fit --config examples/cli/config.yaml``

Hooks are given by ``class_path``/``init_args`` like any callback; fetches in YAML are names
(resolved against the step's outputs, then ``trainer.callback_metrics``), since tensors and
metric objects cannot be written in YAML.
"""

from __future__ import annotations

import os
import sys

from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from train_lightning import Classifier, synthetic_data  # noqa: E402


class SyntheticData(pl.LightningDataModule):
    """The demo's synthetic two-class data."""

    def __init__(self, samples: int = 4096, batch_size: int = 64) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(synthetic_data(self.samples, seed=1), batch_size=self.batch_size,
                          shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(synthetic_data(1024, seed=2), batch_size=256)


def main() -> None:
    cli = LightningCLI(Classifier, SyntheticData, save_config_callback=None)
    for callback in cli.trainer.callbacks:
        hook = getattr(callback, "final_ops_hook", None)
        if hook is not None and hook.final_ops_history:
            for step, values in hook.final_ops_history:
                print(f"step {step:4d}: " + ", ".join(
                    f"{k}={float(v):.4f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
