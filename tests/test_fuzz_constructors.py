"""Fuzzing every public constructor's checked arguments with hypothesis.

For each argument, a hostile value is either what the argument's documented kind allows (then
construction succeeds) or it is rejected at once with a ``TypeError``/``ValueError`` whose
message names the argument. Nothing in between: no bad value accepted silently, no good one
refused. The kinds are written here independently of the package's own checks.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_finalops import (
    CheckpointSaverHook,
    FinalOpsHook,
    GlobalStepWaiterHook,
    HookCallback,
    InMemoryEvaluatorHook,
    LoggingTensorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanTensorHook,
    ProfilerHook,
    SecondOrStepTimer,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
    make_early_stopping_hook,
    stop_if_lower_hook,
    stop_if_no_decrease_hook,
)

HOSTILE = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.0, 2.5, -0.0, float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=4),
    st.binary(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.sampled_from([
        np.int64(3), np.int32(0), np.float64(2.0), np.bool_(True), np.float32("nan"),
        torch.tensor(2), torch.tensor(2.0), torch.tensor(True), torch.tensor([1, 2]),
    ]),
    st.just(object()),
)


def _int(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() \
        and v.dtype != torch.bool


def steps(v: Any) -> bool:
    return _int(v) and int(v) >= 1


def step_index(v: Any) -> bool:
    return _int(v) and int(v) >= 0


def any_int(v: Any) -> bool:
    return _int(v)


def seconds(v: Any) -> bool:
    real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    return real and math.isfinite(v) and v > 0


def flag(v: Any) -> bool:
    return isinstance(v, bool)


def flag_or_none(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def count_or_none(v: Any) -> bool:
    return v is None or step_index(v)


def path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))


def period_steps(v: Any) -> bool:  # MonitoredTrainingSession: None, 0 or negative is "off"
    return v is None or _int(v)


def period_secs(v: Any) -> bool:
    real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    return v is None or (real and not math.isnan(v) and v != math.inf)


def seconds_or_zero(v: Any) -> bool:  # the early-stopping hooks: TF's 0 s is every run
    real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    return real and math.isfinite(v) and v >= 0


def threshold(v: Any) -> bool:
    real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    return real and not math.isnan(v)


SUMMARY = {"x": "x"}
EVALS = FinalOpsHook({"loss": "loss"})

CASES: List[Tuple[str, Callable[[Any], Any], Callable[[Any], bool]]] = [
    ("save_steps", lambda v: CheckpointSaverHook("ckpt", save_steps=v), steps),
    ("save_secs", lambda v: CheckpointSaverHook("ckpt", save_secs=v), seconds_or_zero),
    ("max_to_keep", lambda v: CheckpointSaverHook("ckpt", save_steps=1, max_to_keep=v),
     count_or_none),
    ("checkpoint_dir", lambda v: CheckpointSaverHook(v, save_steps=1), path),
    ("save_steps", lambda v: SummarySaverHook(save_steps=v, summary_op=SUMMARY), steps),
    ("save_secs", lambda v: SummarySaverHook(save_secs=v, summary_op=SUMMARY), seconds_or_zero),
    ("every_n_steps", lambda v: StepCounterHook(every_n_steps=v), steps),
    ("every_n_secs", lambda v: StepCounterHook(every_n_steps=None, every_n_secs=v),
     seconds_or_zero),
    ("save_steps", lambda v: ProfilerHook(save_steps=v), steps),
    ("save_secs", lambda v: ProfilerHook(save_secs=v), seconds_or_zero),
    ("show_memory", lambda v: ProfilerHook(save_steps=1, show_memory=v), flag),
    ("show_dataflow", lambda v: ProfilerHook(save_steps=1, show_dataflow=v), flag),
    ("every_n_iter", lambda v: LoggingTensorHook(["x"], every_n_iter=v), steps),
    ("every_n_secs", lambda v: LoggingTensorHook(["x"], every_n_secs=v), seconds_or_zero),
    ("at_end", lambda v: LoggingTensorHook(["x"], every_n_iter=1, at_end=v), flag),
    ("num_steps", lambda v: StopAtStepHook(num_steps=v), steps),
    ("last_step", lambda v: StopAtStepHook(last_step=v), step_index),
    ("wait_until_step", lambda v: GlobalStepWaiterHook(v), any_int),
    ("fail_on_nan_loss", lambda v: NanTensorHook("loss", fail_on_nan_loss=v), flag),
    ("every_steps", lambda v: SecondOrStepTimer(every_steps=v), steps),
    ("every_secs", lambda v: SecondOrStepTimer(every_secs=v), seconds_or_zero),
    ("is_chief", lambda v: MonitoredSession(is_chief=v), flag_or_none),
    ("across_ranks", lambda v: MonitoredSession(across_ranks=v),
     lambda v: v is None or v is False),  # True needs several ranks
    ("is_chief", lambda v: MonitoredTrainingSession(is_chief=v), flag_or_none),
    ("save_checkpoint_steps", lambda v: MonitoredTrainingSession(save_checkpoint_steps=v),
     period_steps),
    ("save_checkpoint_secs", lambda v: MonitoredTrainingSession(save_checkpoint_secs=v),
     period_secs),
    ("save_summaries_steps", lambda v: MonitoredTrainingSession(save_summaries_steps=v),
     period_steps),
    ("save_summaries_secs", lambda v: MonitoredTrainingSession(save_summaries_secs=v),
     period_secs),
    ("log_step_count_steps", lambda v: MonitoredTrainingSession(log_step_count_steps=v),
     period_steps),
    ("max_to_keep", lambda v: MonitoredTrainingSession(max_to_keep=v), count_or_none),
    ("async_save", lambda v: MonitoredTrainingSession(async_save=v), flag),
    ("async_save", lambda v: CheckpointSaverHook("ckpt", save_steps=1, async_save=v), flag),
    ("max_history", lambda v: FinalOpsHook("loss", max_history=v), steps),
    ("history_on_host", lambda v: FinalOpsHook("loss", history_on_host=v), flag),
    ("include_sanity_check", lambda v: HookCallback(include_sanity_check=v), flag),
    ("log_final_ops", lambda v: HookCallback(log_final_ops=v), flag),
    ("every_n_iter", lambda v: InMemoryEvaluatorHook(print, list, every_n_iter=v), steps),
    ("steps", lambda v: InMemoryEvaluatorHook(print, list, steps=v), steps),
    ("run_every_steps",
     lambda v: make_early_stopping_hook(bool, run_every_secs=None, run_every_steps=v), steps),
    ("run_every_secs", lambda v: make_early_stopping_hook(bool, run_every_secs=v),
     seconds_or_zero),
    ("threshold", lambda v: stop_if_lower_hook(EVALS, "loss", v), threshold),
    ("min_steps", lambda v: stop_if_lower_hook(EVALS, "loss", 0.5, min_steps=v), step_index),
    ("max_steps_without_decrease", lambda v: stop_if_no_decrease_hook(EVALS, "loss", v),
     step_index),
]


@pytest.mark.parametrize(
    "argument, build, allowed", CASES, ids=[f"{i}-{case[0]}" for i, case in enumerate(CASES)]
)
@settings(max_examples=60, deadline=None)
@given(value=HOSTILE)
def test_a_hostile_value_is_accepted_only_if_allowed_and_else_rejected_naming_it(
    argument, build, allowed, value
):
    if allowed(value):
        build(value)
        return
    with pytest.raises((TypeError, ValueError)) as info:
        build(value)
    assert argument in str(info.value), str(info.value)


FETCH_LEAVES = st.one_of(
    st.none(), st.text(max_size=3), st.just(torch.tensor(1.0)), st.just(lambda: 1),
    st.integers(), st.floats(), st.booleans(), st.binary(max_size=2), st.just(object()),
    st.just(torch.nn.Linear(1, 1)), st.just(int),
)
FETCHES = st.recursive(
    FETCH_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
    ),
    max_leaves=8,
)


def _valid_leaf(v: Any) -> bool:
    if v is None or isinstance(v, (str, torch.Tensor)):
        return True
    return callable(v) and not isinstance(v, (type, torch.nn.Module))


def _all_valid(v: Any) -> bool:
    if isinstance(v, dict):
        return all(_all_valid(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_all_valid(x) for x in v)
    return _valid_leaf(v)


@settings(max_examples=150, deadline=None)
@given(fetches=FETCHES)
def test_a_fuzzed_final_ops_structure_is_accepted_or_rejected_naming_its_position(fetches):
    if _all_valid(fetches):
        FinalOpsHook(fetches)
        return
    with pytest.raises(TypeError) as info:
        FinalOpsHook(fetches)
    assert str(info.value).startswith("final_ops"), str(info.value)
