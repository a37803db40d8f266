"""The shared argument checks, as every public constructor applies them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lightning_finalops import (
    CheckpointSaverHook,
    FinalOpsHook,
    HookCallback,
    InMemoryEvaluatorHook,
    LoggingTensorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanTensorHook,
    ProfilerHook,
    StopAtStepHook,
    stop_if_no_decrease_hook,
)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda v: NanTensorHook("loss", fail_on_nan_loss=v), "fail_on_nan_loss"),
        (lambda v: LoggingTensorHook(["loss"], at_end=v), "at_end"),
        (lambda v: ProfilerHook(save_steps=1, show_memory=v), "show_memory"),
        (lambda v: ProfilerHook(save_steps=1, show_dataflow=v), "show_dataflow"),
        (lambda v: MonitoredSession(is_chief=v), "is_chief"),
        (lambda v: MonitoredTrainingSession(is_chief=v), "is_chief"),
        (lambda v: HookCallback(include_sanity_check=v), "include_sanity_check"),
        (lambda v: HookCallback(log_final_ops=v), "log_final_ops"),
    ],
)
@pytest.mark.parametrize("value", ["no", 1, np.bool_(True)])
def test_flags_must_be_real_bools(build, argument, value):
    with pytest.raises(TypeError, match=f"{argument} must be a bool"):
        build(value)


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_numpy_and_torch_integer_scalars_are_ints(tmp_path, value):
    CheckpointSaverHook(tmp_path, save_steps=1, max_to_keep=value)  # accepted
    last_step = StopAtStepHook(last_step=value).last_step
    assert last_step == 3 and type(last_step) is int


@pytest.mark.parametrize("value", [True, 2.0, "3", torch.tensor(3.0), [3]])
def test_other_values_are_not_ints(value):
    with pytest.raises(TypeError, match="last_step must be an int or None, got"):
        StopAtStepHook(last_step=value)


# -- silent mistakes (issue 24): refused where they are made, naming the argument or file -----

def test_a_saver_or_formatter_that_cannot_take_its_arguments_is_refused_at_construction(
        tmp_path) -> None:
    with pytest.raises(TypeError, match=r"saver must be a callable saver\(session, path\)"):
        CheckpointSaverHook(str(tmp_path), save_steps=1, saver=lambda path: None)
    with pytest.raises(TypeError, match=r"formatter must be a callable formatter\(values\)"):
        LoggingTensorHook(["loss"], every_n_iter=1, formatter=lambda: "")
    CheckpointSaverHook(str(tmp_path), save_steps=1, saver=lambda session, path, *a: None)
    LoggingTensorHook(["loss"], every_n_iter=1, formatter=str)  # a builtin: taken as is


def test_a_file_of_other_content_under_a_checkpoint_name_is_named_not_a_key_error(
        tmp_path) -> None:
    torch.save({"weights": torch.ones(1)}, tmp_path / "model.ckpt-5")
    with pytest.raises(TypeError, match=r"model\.ckpt-5 is named like a checkpoint but holds a "
                                        r"dict with keys \['weights'\]"):
        MonitoredSession(modules=torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path))
    torch.save({"pytorch-lightning_version": "2.5", "state_dict": {}}, tmp_path / "model.ckpt-6")
    with pytest.raises(TypeError, match=r"a Lightning checkpoint .*trainer\.fit\(model, "
                                        r"ckpt_path=\.\.\.\)"):
        MonitoredSession(modules=torch.nn.Linear(1, 1), checkpoint_dir=str(tmp_path))


def test_an_early_stopping_hook_among_evaluation_hooks_is_refused_saying_where_it_goes() -> None:
    evaluator = FinalOpsHook({"loss": "val_loss"})
    stopper = stop_if_no_decrease_hook(evaluator, "loss", 10)
    for argument in ("evaluation_hooks", "prediction_hooks"):
        with pytest.raises(ValueError, match=rf"{argument}\[1\] is an early-stopping hook "
                                             r"\(EarlyStoppingHook\).*training_hooks"):
            HookCallback(**{argument: [evaluator, stopper]})
    HookCallback(training_hooks=[stopper], evaluation_hooks=[evaluator])
    with pytest.raises(ValueError, match=r"hooks\[0\] is an early-stopping hook"):
        InMemoryEvaluatorHook(lambda batch: {}, lambda: [], hooks=[stopper])


def test_a_lightning_save_by_the_hooks_logs_no_weights_only_line(tmp_path, caplog) -> None:
    from lightning_models import make_module_class, make_trainer

    with caplog.at_level(logging.INFO):
        make_trainer(max_steps=2, limit_val_batches=0, callbacks=[HookCallback(
            [CheckpointSaverHook(str(tmp_path), save_steps=1)])]).fit(make_module_class()())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt-0", "model.ckpt-1",
                                                         "model.ckpt-2"]
    assert "weights_only" not in caplog.text
