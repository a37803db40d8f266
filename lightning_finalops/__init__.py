"""TensorFlow's session-hook contract (``FinalOpsHook``, ``MonitoredSession``) on PyTorch."""

from typing import TYPE_CHECKING

from lightning_finalops.checkpoints import atomic_write, latest_checkpoint
from lightning_finalops.distributed import AgreementError, AgreementTimeoutError, RankFailedError
from lightning_finalops.engine import Engine
from lightning_finalops.fetches import to_host
from lightning_finalops.hooked_session import HookedSession
from lightning_finalops.hooks import (
    CheckpointSaverHook,
    CheckpointSaverListener,
    EarlyStoppingHook,
    FeedFnHook,
    FinalOpsHook,
    GlobalStepWaiterHook,
    InMemoryEvaluatorHook,
    LoggingTensorHook,
    NanLossDuringTrainingError,
    NanTensorHook,
    NeverTriggerTimer,
    ProfilerHook,
    SecondOrStepTimer,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
    SummaryWriterCache,
    make_early_stopping_hook,
    read_eval_metrics,
    stop_if_higher_hook,
    stop_if_lower_hook,
    stop_if_no_decrease_hook,
    stop_if_no_increase_hook,
)
from lightning_finalops.monitored_session import MonitoredSession, StepContext
from lightning_finalops.session_run_hook import (
    AgreedValue,
    Agreement,
    Coordinator,
    RawSession,
    RunMetadata,
    RunOptions,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from lightning_finalops.sync_audit import SyncAudit, audit_syncs
from lightning_finalops.training_session import MonitoredTrainingSession

if TYPE_CHECKING:  # imported lazily at run time (below): plain loops never import Lightning
    from lightning_finalops.lightning import HookCallback

__version__ = "0.1.0"

__all__ = [
    "AgreedValue",
    "Agreement",
    "AgreementError",
    "AgreementTimeoutError",
    "CheckpointSaverHook",
    "CheckpointSaverListener",
    "Coordinator",
    "EarlyStoppingHook",
    "Engine",
    "FeedFnHook",
    "FinalOpsHook",
    "GlobalStepWaiterHook",
    "HookCallback",
    "HookedSession",
    "InMemoryEvaluatorHook",
    "LoggingTensorHook",
    "MonitoredSession",
    "MonitoredTrainingSession",
    "NanLossDuringTrainingError",
    "NanTensorHook",
    "NeverTriggerTimer",
    "ProfilerHook",
    "RankFailedError",
    "RawSession",
    "RunMetadata",
    "RunOptions",
    "SecondOrStepTimer",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "StepContext",
    "StepCounterHook",
    "StopAtStepHook",
    "SummarySaverHook",
    "SummaryWriterCache",
    "SyncAudit",
    "atomic_write",
    "audit_syncs",
    "latest_checkpoint",
    "make_early_stopping_hook",
    "read_eval_metrics",
    "stop_if_higher_hook",
    "stop_if_lower_hook",
    "stop_if_no_decrease_hook",
    "stop_if_no_increase_hook",
    "to_host",
]


def __getattr__(name: str) -> object:
    # HookCallback imports Lightning; plain-loop users do not pay for that import.
    if name == "HookCallback":
        from lightning_finalops.lightning import HookCallback

        return HookCallback
    raise AttributeError(f"module 'lightning_finalops' has no attribute {name!r}")
