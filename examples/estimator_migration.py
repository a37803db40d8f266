"""Porting ``tf.estimator`` hooks to Lightning: TF1 snippets (in comments) beside their ports.

Run: ``python examples/estimator_migration.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_finalops import (
    FinalOpsHook,
    HookCallback,
    SessionRunArgs,
    SessionRunHook,
    to_host,
)

# --- 1. A custom hook moves over unchanged -----------------------------------------------
# TF1:
#   class LossThresholdHook(tf.compat.v1.train.SessionRunHook):
#       def before_run(self, run_context):
#           return tf.compat.v1.train.SessionRunArgs(loss)          # a graph tensor
#       def after_run(self, run_context, run_values):
#           if run_values.results < self._threshold:
#               run_context.request_stop()
#
# PyTorch: the same class; the fetch is a *name* from the dict training_step returns.


class LossThresholdHook(SessionRunHook):
    """Stops training once the step's loss falls below ``threshold``."""

    def __init__(self, threshold: float, check_every: int = 10) -> None:
        self._threshold, self._every = threshold, check_every

    def before_run(self, run_context):
        # Fetch only every few steps: the comparison below needs the value on the host.
        if run_context.session.global_step % self._every == 0:
            return SessionRunArgs("loss")
        return None

    def after_run(self, run_context, run_values) -> None:
        if run_values.results is not None and run_values.results.item() < self._threshold:
            print(f"  loss below {self._threshold} at step {run_context.session.global_step}")
            run_context.request_stop()


# --- 2. model_fn with eval_metric_ops -> a LightningModule with torchmetrics --------------
# TF1:
#   def model_fn(features, labels, mode):
#       logits = tf.compat.v1.layers.dense(features, 2)
#       loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
#       acc = tf.compat.v1.metrics.accuracy(labels, tf.argmax(logits, 1))   # (value, update)
#       return tf.estimator.EstimatorSpec(
#           mode, loss=loss, train_op=train_op, eval_metric_ops={"accuracy": acc},
#           training_hooks=[LossThresholdHook(0.3)],
#           evaluation_hooks=[...], prediction_hooks=[...])
#
# PyTorch: update ops -> metric.update() in validation_step; value ops -> FinalOpsHook.


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(10, 2)
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self.layer(x), y)}

    def on_validation_epoch_start(self) -> None:
        self.accuracy.reset()  # tf.metrics state was local to each evaluate() call

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        self.accuracy.update(logits, y)                       # the update_op
        self.log("loss", F.cross_entropy(logits, y))          # Estimator's "loss" metric

    def predict_step(self, batch, batch_idx):
        return {"probabilities": self.layer(batch[0]).softmax(-1)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class CountPredictions(SessionRunHook):
    """A prediction hook: counts the rows predicted (fetched by name from predict_step)."""

    def __init__(self) -> None:
        self.rows = 0

    def before_run(self, run_context):
        return SessionRunArgs("probabilities")

    def after_run(self, run_context, run_values) -> None:
        self.rows += run_values.results.shape[0]


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32)


def main() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    pl.seed_everything(0, verbose=False)
    model = Model()

    # --- 3. EstimatorSpec hooks -> one HookCallback ---------------------------------------
    # Estimator.evaluate appended FinalOpsHook(eval_dict) itself and returned its values;
    # here the FinalOpsHook is explicit, and it runs at the end of every validation.
    metrics = FinalOpsHook({"accuracy": model.accuracy, "loss": "loss"})
    predictions = CountPredictions()
    callback = HookCallback(
        training_hooks=[LossThresholdHook(0.3)],
        evaluation_hooks=[metrics],
        prediction_hooks=[predictions],
    )
    trainer = pl.Trainer(max_epochs=20, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)

    # TF1: estimator.train(input_fn, max_steps=...)
    trainer.fit(model, data(1024, 0), data(256, 1))

    # TF1: results = estimator.evaluate(input_fn, steps=4)   # steps -> limit_val_batches
    trainer.limit_val_batches = 4
    trainer.validate(model, data(1024, 2), verbose=False)
    step, results = metrics.final_ops_history[-1]
    results = to_host(results)
    print(f"evaluate at step {step}: accuracy={results['accuracy']:.4f} loss={results['loss']:.4f}")
    print(f"evaluations so far: {[s for s, _ in metrics.final_ops_history]}")

    # TF1: list(estimator.predict(input_fn))
    trainer.predict(model, data(100, 3))
    print(f"predicted {predictions.rows} rows")


if __name__ == "__main__":
    main()
