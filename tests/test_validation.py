"""The shared argument checks, as every public constructor applies them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_finalops import (
    CheckpointSaverHook,
    HookCallback,
    LoggingTensorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanTensorHook,
    ProfilerHook,
    StopAtStepHook,
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
