"""The standard hooks, one module per family."""

from lightning_finalops.hooks.checkpoint import CheckpointSaverHook, CheckpointSaverListener
from lightning_finalops.hooks.early_stopping import (
    EarlyStoppingHook,
    make_early_stopping_hook,
    read_eval_metrics,
    stop_if_higher_hook,
    stop_if_lower_hook,
    stop_if_no_decrease_hook,
    stop_if_no_increase_hook,
)
from lightning_finalops.hooks.evaluation import InMemoryEvaluatorHook
from lightning_finalops.hooks.feed import FeedFnHook
from lightning_finalops.hooks.final_ops import FinalOpsHook
from lightning_finalops.hooks.profiler import ProfilerHook
from lightning_finalops.hooks.stop import (
    GlobalStepWaiterHook,
    NanLossDuringTrainingError,
    NanTensorHook,
    StopAtStepHook,
)
from lightning_finalops.hooks.summary import StepCounterHook, SummarySaverHook, SummaryWriterCache
from lightning_finalops.hooks.tensor_logging import LoggingTensorHook
from lightning_finalops.hooks.timers import NeverTriggerTimer, SecondOrStepTimer

__all__ = [
    "CheckpointSaverHook",
    "CheckpointSaverListener",
    "EarlyStoppingHook",
    "FeedFnHook",
    "FinalOpsHook",
    "GlobalStepWaiterHook",
    "InMemoryEvaluatorHook",
    "LoggingTensorHook",
    "NanLossDuringTrainingError",
    "NanTensorHook",
    "NeverTriggerTimer",
    "ProfilerHook",
    "SecondOrStepTimer",
    "StepCounterHook",
    "StopAtStepHook",
    "SummarySaverHook",
    "SummaryWriterCache",
    "make_early_stopping_hook",
    "read_eval_metrics",
    "stop_if_higher_hook",
    "stop_if_lower_hook",
    "stop_if_no_decrease_hook",
    "stop_if_no_increase_hook",
]
