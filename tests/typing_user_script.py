"""A user's script: the public API as mypy sees it."""
from lightning_finalops import (
    FinalOpsHook,
    HookCallback,
    MonitoredTrainingSession,
    stop_if_higher_hook,
)

final = FinalOpsHook({"acc": "val_acc"})
callback = HookCallback(final_ops={"acc": "val_acc"}, name="main")
stopper = stop_if_higher_hook(final, "acc", 0.9)
stopped: bool = stopper.stopped
history = callback.evaluation_history
with MonitoredTrainingSession(hooks=[stopper]) as sess:
    step: int = sess.global_step
