"""Run by tests/test_ddp_agreement.py: ``python ddp_agreement_script.py OUT_DIR MODE``.

Two CPU processes (gloo, ``strategy="ddp"``) that disagree on purpose, each writing what it
saw to ``OUT_DIR/<mode>-rank<r>.pt``:

- ``clocks``: each rank's clock (``lightning_finalops.hooks.timers.clock``) runs at its own
  speed; a ``CheckpointSaverHook(save_secs=...)`` and a ``LoggingTensorHook(every_n_secs=...)``
  that fetches a torchmetrics metric (``compute()`` is a collective) must trigger at the same
  steps on both ranks, or the run hangs.
- ``uneven``: a stop requested on rank 1 only, ten no-op hooks, and every collective counted
  while ``HookCallback`` handles a training batch; validations in which rank 0 has 3 batches
  and rank 1 has 1, with a hook that stops rank 0's evaluation early; then ``predict`` over 5
  samples (3 batches and 2) with a per-run prediction hook.
- ``early``: a ``stop_if_lower_hook`` checking every 3 s on clocks that disagree, over a
  validation metric that only rank 1 sees cross the threshold (logged without sync): rank 1
  alone decides to stop, and both ranks must stop at the same step.
- ``raise``: a training hook raises on rank 1 only, at global step 3; each rank records the
  exception ``fit`` ended with, and the step.
- ``nan``: a ``NanTensorHook`` whose fetch is NaN on rank 1 only, at global step 3.
- ``sigterm``: rank 1 alone receives SIGTERM at global step 3, with a
  ``CheckpointSaverHook``; then ``fit(ckpt_path=...)`` resumes from the checkpoint written.
"""

import functools
import itertools
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torchmetrics  # noqa: E402
from lightning_models import (  # noqa: E402
    ResumableBatches,
    dataset,
    make_module_class,
    make_trainer,
)
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_finalops import (  # noqa: E402
    CheckpointSaverHook,
    CheckpointSaverListener,
    FinalOpsHook,
    HookCallback,
    LoggingTensorHook,
    NanTensorHook,
    SessionRunHook,
    stop_if_lower_hook,
)
from lightning_finalops.hooks import timers  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "barrier", "reduce", "gather",
               "scatter", "all_gather_object", "broadcast_object_list", "reduce_scatter")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", 0))


class Module(make_module_class()):
    """Per-rank data in order; a training metric; rank-dependent evaluation/predict loaders."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_mean = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.train_mean.update(out["loss"].detach())
        return out

    def _rank_subset(self, n: int, seed: int, indices_per_rank) -> DataLoader:
        data = dataset(n, seed)
        return DataLoader(Subset(data, indices_per_rank[rank()]), batch_size=1)

    def train_dataloader(self) -> DataLoader:
        return self._rank_subset(16, 0, {0: range(0, 16, 2), 1: range(1, 16, 2)})

    def val_dataloader(self) -> DataLoader:
        return self._rank_subset(4, 1, {0: [0, 1, 2], 1: [3]})  # 3 batches and 1

    def predict_dataloader(self) -> DataLoader:
        return self._rank_subset(5, 3, {0: [0, 2, 4], 1: [1, 3]})  # as Lightning splits 5


class Listener(CheckpointSaverListener):
    def __init__(self) -> None:
        self.saved = []

    def after_save(self, session, global_step_value):
        self.saved.append(global_step_value)


class Logged:
    """LoggingTensorHook's formatter: records the global step of every log."""

    def __init__(self) -> None:
        self.steps = []
        self.trainer = None

    def __call__(self, values) -> str:
        self.steps.append(self.trainer.global_step)
        return f"acc = {float(values['acc'])}"


def clocks(out_dir: str) -> dict:
    # rank 0's clock advances 1 s per reading, rank 1's 2.7 s: without agreement the two
    # ranks would save and compute() at different steps, and wait for each other forever
    speed = {0: 1.0, 1: 2.7}[rank()]
    ticks = itertools.count()
    timers.clock = lambda: next(ticks) * speed
    model = Module()
    listener, logged = Listener(), Logged()
    callback = HookCallback(training_hooks=[
        LoggingTensorHook({"acc": model.train_mean}, every_n_secs=2, formatter=logged),
        CheckpointSaverHook(os.path.join(out_dir, "ckpt"), save_secs=3, listeners=[listener]),
    ])
    trainer = make_trainer(max_steps=8, callbacks=[callback], strategy="ddp", devices=2,
                           use_distributed_sampler=False, limit_val_batches=0)
    logged.trainer = trainer
    trainer.fit(model)
    return {"saved": listener.saved, "logged": logged.steps, "global_step": trainer.global_step}


class StopOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values) -> None:
        if rank() == 1 and run_context.session.global_step == 4:
            run_context.request_stop()


class NoOp(SessionRunHook):
    def before_run(self, run_context):
        return None

    def after_run(self, run_context, run_values):
        pass


class StopRankZeroEvaluation(SessionRunHook):
    def __init__(self) -> None:
        self.runs = []

    def begin(self) -> None:
        self.runs.append(0)

    def after_run(self, run_context, run_values) -> None:
        self.runs[-1] += 1
        if rank() == 0:
            run_context.request_stop()


class CountRuns(SessionRunHook):
    def __init__(self) -> None:
        self.runs = 0

    def after_run(self, run_context, run_values) -> None:
        self.runs += 1


def count_collectives(callback_class) -> dict:
    """Count every collective issued while HookCallback handles a training batch."""
    counts = {"blocking": 0, "async": 0, "batches": 0}
    inside = [False]

    def counting(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if inside[0]:
                counts["async" if kwargs.get("async_op") else "blocking"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counting(getattr(dist, name)))

    def in_batch_hook(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            inside[0] = True
            try:
                return method(self, *args, **kwargs)
            finally:
                inside[0] = False
        return wrapper

    original_end = callback_class.on_train_batch_end
    callback_class.on_train_batch_start = in_batch_hook(callback_class.on_train_batch_start)

    def end(self, *args, **kwargs):
        counts["batches"] += 1
        return original_end(self, *args, **kwargs)

    callback_class.on_train_batch_end = in_batch_hook(end)
    return counts


def uneven(out_dir: str) -> dict:
    counts = count_collectives(HookCallback)
    model = Module()
    evaluation_stop, predictions = StopRankZeroEvaluation(), CountRuns()
    final = FinalOpsHook({"mse": model.val_sample_mse})
    callback = HookCallback(
        training_hooks=[StopOnRankOne(), *(NoOp() for _ in range(10))],
        evaluation_hooks=[evaluation_stop, final],
        prediction_hooks=[predictions],
    )
    trainer = make_trainer(max_epochs=3, callbacks=[callback], strategy="ddp", devices=2,
                           use_distributed_sampler=False, val_check_interval=2)
    trainer.fit(model)
    fit_step = trainer.global_step
    trainer.validate(model)
    trainer.predict(model)
    return {
        "global_step": fit_step,
        "collectives": counts,
        "evaluation_runs": evaluation_stop.runs,
        "evaluations": final.final_ops_history,
        "prediction_runs": predictions.runs,
    }


class ScriptedValidation(Module):
    """Logs ``scripted`` per rank, unsynced: rank 1's drops below 0.5 at its third validation."""

    def __init__(self) -> None:
        super().__init__()
        self.validations = 0
        self.values = [1.0] * 100 if rank() == 0 else [1.0, 1.0] + [0.2] * 98

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("scripted", self.values[self.validations])
        return out

    def on_validation_epoch_end(self) -> None:
        self.validations += 1


def early(out_dir: str) -> dict:
    speed = {0: 1.0, 1: 2.7}[rank()]
    ticks = itertools.count()
    timers.clock = lambda: next(ticks) * speed
    ckpt_dir = os.path.join(out_dir, "early-ckpt")

    def fit(ckpt_path=None):
        model = ScriptedValidation()
        final = FinalOpsHook({"scripted": "scripted"})
        stopper = stop_if_lower_hook(final, "scripted", 0.5, run_every_secs=3)
        saver = CheckpointSaverHook(ckpt_dir, save_steps=1)
        trainer = make_trainer(
            max_epochs=10, strategy="ddp", devices=2, use_distributed_sampler=False,
            val_check_interval=2, callbacks=[HookCallback(
                training_hooks=[stopper, saver], evaluation_hooks=[final])],
        )
        checked = []
        original = stopper._should_stop_fn

        def should_stop() -> bool:
            checked.append(trainer.global_step)
            return original()

        stopper._should_stop_fn = should_stop
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, stopper, checked, final, model

    trainer, stopper, checked, final, _ = fit()
    result = {"global_step": trainer.global_step, "stopped": stopper.stopped,
              "checked": checked, "evaluations": [step for step, _ in final.final_ops_history]}
    # resume from the last checkpoint (rank 0 wrote it): the early stop holds on every rank
    latest = os.path.join(ckpt_dir, f"model.ckpt-{trainer.global_step}")
    trainer, stopper, checked, _, model = fit(latest)
    result["resumed"] = {"global_step": trainer.global_step, "stopped": stopper.stopped,
                         "checked": checked, "validations": model.validations}
    return result


class RaiseOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if rank() == 1 and run_context.session.global_step == 3:
            raise ValueError("boom on rank 1")


class SigtermRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if rank() == 1 and run_context.session.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a spot instance's notice would


class ResumableModule(Module):
    def train_dataloader(self):
        x, y = dataset(16, 0).tensors  # this rank's batches, resumable mid-epoch
        return ResumableBatches([(x[i:i + 1], y[i:i + 1]) for i in range(rank(), 16, 2)])


def sigterm(out_dir: str) -> dict:
    ckpt_dir = os.path.join(out_dir, "sigterm-ckpt")

    def fit(hooks, ckpt_path=None, directory=ckpt_dir):
        torch.manual_seed(0)
        model = ResumableModule()
        trainer = make_trainer(max_epochs=1, strategy="ddp", devices=2,
                               use_distributed_sampler=False,
                               callbacks=[HookCallback([*hooks, CheckpointSaverHook(
                                   directory, save_steps=100)])])
        result = {"error": None}
        try:
            trainer.fit(model, ckpt_path=ckpt_path)
        except BaseException as e:  # noqa: BLE001 - SIGTERMException is a SystemExit
            result["error"] = type(e).__name__
        result.update(global_step=trainer.global_step,
                      w=model.layer.weight.detach().clone())
        return result

    class Restored(SessionRunHook):
        def after_create_session(self, session, coord):
            self.step = session.global_step

    first = fit([SigtermRankOne()])
    dist.barrier()  # the relaunch reads the checkpoint rank 0 wrote
    restored = Restored()
    resumed = fit([restored], os.path.join(ckpt_dir, f"model.ckpt-{first['global_step']}"))
    resumed["restored_step"] = restored.step
    straight = fit([], directory=os.path.join(out_dir, "sigterm-straight"))
    return {"first": first, "resumed": resumed, "straight": straight,
            "files": sorted(os.listdir(ckpt_dir)) if rank() == 0 else None}


def failing(out_dir: str, mode: str) -> dict:
    """A hook fails (or sees NaN) on rank 1 only: every rank's fit must end, none hang."""
    model = Module()
    box = {}

    def loss():
        nan = rank() == 1 and box["trainer"].global_step == 3
        return torch.tensor(float("nan") if nan else 0.0)

    hook = RaiseOnRankOne() if mode == "raise" else NanTensorHook(loss)
    trainer = make_trainer(max_epochs=3, strategy="ddp", devices=2,
                           use_distributed_sampler=False, callbacks=[HookCallback([hook])])
    box["trainer"] = trainer
    result = {"error": None}
    try:
        trainer.fit(model)
    except Exception as e:  # noqa: BLE001 - recorded: the test checks it
        result["error"] = (type(e).__name__, str(e))
    result["global_step"] = trainer.global_step
    return result


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    if mode in ("raise", "nan"):
        result = failing(out_dir, mode)
    elif mode == "sigterm":
        result = sigterm(out_dir)
    else:
        result = {"clocks": clocks, "uneven": uneven, "early": early}[mode](out_dir)
    torch.save(result, os.path.join(out_dir, f"{mode}-rank{rank()}.pt"))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # avoids gloo's abort at interpreter exit


if __name__ == "__main__":
    main()
