"""HookCallback on CUDA: no host synchronisation caused by our code per step; values on CUDA.

Skipped without CUDA (CI has none); run on a GPU machine with ``python -m pytest -q -m gpu``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning_models import make_module_class, make_trainer

from lightning_finalops import FinalOpsHook, HookCallback, SessionRunArgs, SessionRunHook

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class FetchEveryStep(SessionRunHook):
    """Fetches tensors, names and a metric on every run (the worst case for syncs)."""

    def __init__(self, model) -> None:
        self.model = model
        self.devices = set()

    def before_run(self, run_context):
        return SessionRunArgs({"loss": "loss", "w": self.model.layer.weight,
                               "norm": lambda: self.model.layer.weight.norm()})

    def after_run(self, run_context, run_values) -> None:
        self.devices.update(str(v.device) for v in run_values.results.values())


def test_fit_on_cuda_causes_no_synchronisation_in_our_code_and_keeps_values_on_cuda() -> None:
    model = make_module_class()(n_train=64, n_val=16)
    step_hook = FetchEveryStep(model)
    final = FinalOpsHook({"mean": model.val_mean_loss, "w": model.layer.weight})
    training_final = FinalOpsHook({"w": lambda: model.layer.weight * 1, "loss": "train_loss"})
    callback = HookCallback(training_hooks=[step_hook, training_final], evaluation_hooks=[final],
                            log_final_ops=False)
    trainer = make_trainer(accelerator="cuda", max_epochs=2, callbacks=[callback])
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught
            if "synchroniz" in str(w.message) and "lightning_finalops" in w.filename]
    assert ours == [], [(w.filename, w.lineno, str(w.message)) for w in ours]
    assert step_hook.devices == {"cuda:0"}
    assert all(v.is_cuda for _, values in final.final_ops_history for v in values.values())
    assert all(v.is_cuda for v in training_final.final_ops_values.values())


class ReadsTheLoss(SessionRunHook):
    """The positive control: ``float(tensor)`` of a CUDA value in ``after_run``."""

    def before_run(self, run_context):
        return SessionRunArgs("loss")

    def after_run(self, run_context, run_values):
        float(run_values.results)


def _audited_fit(max_steps: int, *hooks: SessionRunHook):
    from lightning_finalops import NanTensorHook, audit_syncs

    model = make_module_class()(n_train=64, n_val=16)
    training_hooks = [FetchEveryStep(model), NanTensorHook("loss", non_blocking=True), *hooks]
    callback = HookCallback(training_hooks=training_hooks, log_final_ops=False,
                            final_ops={"mean": model.val_mean_loss, "loss": "val_loss"})
    trainer = make_trainer(accelerator="cuda", max_steps=max_steps, max_epochs=-1,
                           callbacks=[callback])
    with audit_syncs() as audit:
        trainer.fit(model)
    return {key: n for key, n in audit.counts.items() if key[0] != "user code"}


def test_the_audit_finds_no_sync_of_ours_per_step_on_cuda_and_finds_the_control() -> None:
    # syncs inside torch, Lightning or torchmetrics that our code caused count as ours
    assert _audited_fit(4) == _audited_fit(16)
    with_control = _audited_fit(6, ReadsTheLoss())
    assert with_control.get(("ReadsTheLoss", "after_run"), 0) >= 6
