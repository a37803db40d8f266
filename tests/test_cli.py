"""HookCallback configured from LightningCLI YAML (class_path/init_args), for both packages."""

from __future__ import annotations

import importlib

import pytest
from lightning_models import PACKAGES, make_module_class

pytest.importorskip("jsonargparse")

CONFIG = """
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_finalops.HookCallback
      init_args:
        final_ops: {loss: val_loss}
        evaluation_hooks:
          - class_path: lightning_finalops.FinalOpsHook
            init_args:
              final_ops: [val_loss, train_loss]
        name: from_yaml
"""


@pytest.mark.parametrize("package", PACKAGES)
def test_hook_callback_and_hooks_are_built_from_yaml(tmp_path, package: str) -> None:
    cli_module = importlib.import_module(f"{package}.cli")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = cli_module.LightningCLI(
        make_module_class(package), run=False, save_config_callback=None,
        args=["--config", str(config)],
    )
    from lightning_finalops import FinalOpsHook, HookCallback

    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, HookCallback)]
    assert callback.name == "from_yaml"
    yaml_hook = callback.evaluation_hooks[0]
    assert isinstance(yaml_hook, FinalOpsHook) and yaml_hook.final_ops == ["val_loss", "train_loss"]
    cli.trainer.fit(cli.model)
    assert [step for step, _ in callback.final_ops_hook.final_ops_history] == [4, 8, 8]
    assert [step for step, _ in yaml_hook.final_ops_history] == [4, 8]
    loss, _ = yaml_hook.final_ops_values
    assert loss.item() == pytest.approx(cli.trainer.callback_metrics["val_loss"].item())
