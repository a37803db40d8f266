"""Run by tests/test_kill_resume.py: ``python kill_resume_script.py ENGINE CKPT_DIR OUT [N]``.

Trains a tiny model to a fixed last step with a ``CheckpointSaverHook``, resuming from
``CKPT_DIR`` when it holds checkpoints, then saves the final weights to ``OUT``. With ``N``,
the process kills itself (SIGKILL) in the middle of its N-th checkpoint write: half of the
checkpoint's bytes are on disk under the temporary name, as after a power cut.

ENGINE ``plain``: ``MonitoredSession(checkpoint_dir=...)``; ENGINE ``lightning``:
``Trainer.fit(ckpt_path=<latest checkpoint>)`` with ``HookCallback``.
"""

import io
import os
import signal
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

from lightning_finalops import (  # noqa: E402
    CheckpointSaverHook,
    HookCallback,
    MonitoredSession,
    StopAtStepHook,
)
from lightning_finalops.checkpoints import latest_checkpoint  # noqa: E402

LAST_STEP = 12


def die_in_the_middle_of_write(n: int, writes) -> None:
    """Wrap ``writes`` (``(module, name)`` of functions ``f(obj, path)``) to die at call n."""
    calls = [0]
    real_save = torch.save

    def wrap(original):
        def write(obj, path, *args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return original(obj, path, *args, **kwargs)
        return write

    for module, name in writes:
        setattr(module, name, wrap(getattr(module, name)))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, generator=g)
    return x, x.sum(1, keepdim=True)


def plain(ckpt_dir: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def train_step(x, y):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    hooks = [StopAtStepHook(last_step=LAST_STEP), CheckpointSaverHook(ckpt_dir, save_steps=2)]
    with MonitoredSession(hooks, modules=model, optimizers=optimizer,
                          checkpoint_dir=ckpt_dir) as sess:
        while not sess.should_stop():
            sess.run(lambda step=sess.global_step: train_step(*batch(step)))
    return model


def lightning(ckpt_dir: str) -> torch.nn.Module:
    from lightning_models import make_module_class, make_trainer

    torch.manual_seed(0)
    model = make_module_class()(n_train=8, n_val=4)  # 4 batches per epoch
    callback = HookCallback(training_hooks=[CheckpointSaverHook(ckpt_dir, save_steps=4)])
    trainer = make_trainer(max_steps=LAST_STEP, max_epochs=-1, callbacks=[callback],
                           limit_val_batches=0)
    trainer.fit(model, ckpt_path=latest_checkpoint(ckpt_dir))
    return model


def main() -> None:
    engine, ckpt_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if len(sys.argv) > 4:
        import lightning_fabric.plugins.io.torch_io as torch_io

        writes = [(torch, "save")] if engine == "plain" else [(torch_io, "_atomic_save")]
        die_in_the_middle_of_write(int(sys.argv[4]), writes)
    model = {"plain": plain, "lightning": lightning}[engine](ckpt_dir)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main()
