"""A hand-written PyTorch training loop under ``MonitoredSession``, TF1-style.

The TF1 original::

    hook = tf.compat.v1.train.FinalOpsHook(final_ops={"mean_loss": mean_loss, "w_norm": w_norm})
    with tf.compat.v1.train.MonitoredSession(hooks=[hook, StopAtStepHook(last_step=400)]) as sess:
        while not sess.should_stop():
            sess.run(train_op)
    print(hook.final_ops_values)

Here the step is a Python function, the metric a torchmetrics object, and the loop ends either
when a hook requests a stop or when the data runs out (``StopIteration`` ends the ``with``
block cleanly, and every hook's ``end()`` still runs).

Run: ``python examples/plain_loop.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_finalops import (
    FinalOpsHook,
    MonitoredSession,
    SessionRunArgs,
    SessionRunHook,
    StopAtStepHook,
    to_host,
)


class LogEvery(SessionRunHook):
    """A custom hook: fetches the step's ``loss`` by name every ``n`` runs and prints it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def before_run(self, run_context):
        if run_context.session.global_step % self.n == 0:
            return SessionRunArgs({"loss": "loss"})
        return None  # nothing fetched, nothing copied on the other runs

    def after_run(self, run_context, run_values) -> None:
        if run_values.results is not None:
            loss = to_host(run_values.results)["loss"]
            print(f"step {run_context.session.global_step:4d}  loss {loss.item():.4f}")


def batches(n_batches: int, batch_size: int = 32):
    """Synthetic regression data: y = x @ w_true + noise."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(8, 1, generator=g)
    for _ in range(n_batches):
        x = torch.randn(batch_size, 8, generator=g)
        yield x, x @ w_true + 0.1 * torch.randn(batch_size, 1, generator=g)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    mean_loss = torchmetrics.MeanMetric()
    data = batches(n_batches=1000)

    def train_step() -> dict:
        x, y = next(data)  # StopIteration here ends the session cleanly
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss.update(loss.detach())
        return {"loss": loss}

    final = FinalOpsHook({
        "mean_loss": mean_loss,                       # a metric: compute() at the end
        "last_loss": "loss",                          # a name: the last step's returned dict
        "w_norm": lambda: model.weight.norm(),        # a callable
        "bias": model.bias,                           # a tensor: a snapshot of its value
    })
    hooks = [StopAtStepHook(last_step=400), LogEvery(100), final]
    with MonitoredSession(hooks=hooks, modules=model) as sess:
        while not sess.should_stop():
            sess.run(train_step)

    values = to_host(final.final_ops_values)
    print(f"\nstopped at global step {sess.global_step}")
    for name, value in values.items():
        print(f"{name:>10}: {value.reshape(-1).tolist()}")


if __name__ == "__main__":
    main()
