"""Run by tests/test_failing_ranks.py, one rank per process: ``failing_ranks_script.py OUT MODE``.

Launched by ``torch.distributed.run`` (one agent, or two agents as two simulated nodes) or
as two bare processes (``RANK``/``WORLD_SIZE``/``MASTER_*`` set by the test, no agent that
could end the others). A plain loop whose step has no collective of its own, under
``MonitoredSession``/``MonitoredTrainingSession``, with a fault on one rank. Each rank
records what it saw to ``OUT/<mode>-rank<r>.pt``: the global step it stopped at, the
exception that ended its loop (type and text), the library's warnings, the seconds from
the fault to its end, and whether the script's own final ``dist.barrier()`` passed.

MODE:
    uneven: rank 0 has 3 batches, rank 1 has 6; a NanTensorHook (it declares a value to
        agree on) and a FinalOpsHook.
    uneven_final_ops: the same data with a lone FinalOpsHook (it declares nothing).
    raise: a hook raises ValueError on rank 1 at global step 3; each rank's loop catches
        what ends it (a loop that logs and goes on) and reaches the final barrier.
    nan_fail / nan_stop: the loss is NaN on rank 1 at global step 3, with
        ``NanTensorHook(fail_on_nan_loss=True / False)``.
    kill: rank 1 SIGKILLs itself at global step 3; ``agreement_timeout=20``.
    exit_open: rank 0 runs 3 steps and exits without closing its session (rank 1 has 6).
    chief_early_stop: an early-stopping hook among ``chief_only_hooks`` decides at step 3.
    sigterm_first / sigterm_resume / sigterm_straight: ``MonitoredTrainingSession`` with
        checkpoints into ``OUT/ckpt`` (``OUT/straight``) trains a model with momentum on
        data by step to global step 10; in ``sigterm_first`` rank 1 gets SIGTERM at step 5,
        ``sigterm_resume`` relaunches from its checkpoint, ``sigterm_straight`` runs
        uninterrupted.
"""

import logging
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from lightning_finalops import (  # noqa: E402
    FinalOpsHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanTensorHook,
    SessionRunHook,
    StopAtStepHook,
    make_early_stopping_hook,
)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class RaiseOnRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if dist.get_rank() == 1 and run_context.session.global_step == 3:
            raise ValueError("boom on rank 1")


class KillRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if dist.get_rank() == 1 and run_context.session.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)


class SigtermRankOne(SessionRunHook):
    def after_run(self, run_context, run_values):
        if dist.get_rank() == 1 and run_context.session.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as a spot instance's notice would


def preemption(out: str, mode: str, rank: int, records: Records) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    hooks = [StopAtStepHook(last_step=10)]
    if mode == "sigterm_first":
        hooks.append(SigtermRankOne())
    directory = os.path.join(out, "straight" if mode == "sigterm_straight" else "ckpt")
    seen = {}
    with MonitoredTrainingSession(checkpoint_dir=directory, save_checkpoint_steps=100,
                                  hooks=hooks, modules=net, optimizers=optimizer) as sess:
        seen["restored_step"] = sess.global_step
        while not sess.should_stop():
            g = torch.Generator().manual_seed(sess.global_step)  # the same data on every rank
            batch = torch.randn(4, 3, generator=g)

            def step(x=batch):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True))
                loss.backward()
                optimizer.step()

            sess.run(step)
            seen["global_step"] = sess.global_step
            seen["warnings"] = list(records.lines)
            # saved at every run: a rank whose SIGTERM ends it in the session's end has
            # recorded what it saw
            torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))
    seen.update(w=net.weight.detach().clone(), b=net.bias.detach().clone(),
                momentum=[optimizer.state[p]["momentum_buffer"].clone()
                          for p in net.parameters()], warnings=records.lines)
    torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = Records()
    logging.getLogger("lightning_finalops").addHandler(records)
    if mode.startswith("sigterm"):
        preemption(out, mode, rank, records)
        return
    w = torch.zeros(())
    seen = {"error": None}

    def step(x):
        nonlocal w
        w = w + x  # no collective of its own
        loss = torch.tensor(float("nan")) if mode.startswith("nan") and rank == 1 \
            and x == 3.0 else w
        return {"loss": loss}

    final = FinalOpsHook({"w": lambda: w})
    timeout = 20 if mode == "kill" else 300
    batches = [1.0, 2.0, 3.0] if rank == 0 else [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    if mode == "uneven":
        hooks = [NanTensorHook("loss"), final]
    elif mode == "uneven_final_ops":
        hooks = [final]
    elif mode == "raise":
        hooks, batches = [RaiseOnRankOne(), final], [1.0] * 8
    elif mode in ("nan_fail", "nan_stop"):
        hooks = [NanTensorHook("loss", fail_on_nan_loss=mode == "nan_fail"), final]
        batches = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    elif mode == "kill":
        hooks, batches = [KillRankOne(), final], [1.0] * 8
    else:
        hooks, batches = [final], [1.0] * 8
    started = time.monotonic()
    if mode == "exit_open" and rank == 0:
        sess = MonitoredSession([NanTensorHook("loss"), final])
        for x in (1.0, 2.0, 3.0):
            sess.run(lambda x=x: step(x))
        torch.save({"global_step": sess.global_step}, os.path.join(out, f"{mode}-rank0.pt"))
        return  # the interpreter exits with the session open
    if mode == "exit_open":
        hooks = [NanTensorHook("loss"), final]
    try:
        if mode == "chief_early_stop":
            box = {}
            stopper = make_early_stopping_hook(lambda: box["sess"].global_step >= 3,
                                               run_every_secs=None, run_every_steps=1)
            sess = MonitoredTrainingSession(hooks=hooks, chief_only_hooks=[stopper])
            box["sess"] = sess
        else:
            sess = MonitoredSession(hooks, agreement_timeout=timeout)
        with sess:
            data = iter(batches)
            while not sess.should_stop():
                sess.run(lambda: step(next(data)))  # StopIteration: this rank's data ended
    except Exception as e:  # noqa: BLE001 - recorded: the test checks it
        seen["error"] = (type(e).__name__, str(e))
    seen["global_step"] = sess.global_step
    seen["seconds"] = time.monotonic() - started
    seen["warnings"] = records.lines
    if mode == "chief_early_stop" and rank == 0:
        seen["stopped"] = stopper.stopped
    try:
        if mode not in ("kill", "exit_open"):
            dist.barrier()  # the script's own collective after the session
        seen["barrier"] = True
    except Exception as e:  # noqa: BLE001
        seen["barrier"] = repr(e)
    torch.save(seen, os.path.join(out, f"{mode}-rank{rank}.pt"))
    if mode == "kill":
        os._exit(0)  # the peer is gone: destroying the group could wait for it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
