"""The metric code Lightning and torchmetrics users write, under ``HookCallback(final_ops=...)``.

The documented pattern updates a torchmetrics metric in ``validation_step`` and logs the
metric object (``self.log("val_acc", self.val_acc)``); Lightning then computes it at the end
of each validation epoch and resets it. The final values must be each validation's values,
and the end of ``fit`` must report the last validation's value, not an empty metric's.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning_models import make_trainer, pl_package
from torch.utils.data import DataLoader, TensorDataset

from lightning_finalops import FinalOpsHook, HookCallback

pl = pl_package()


def loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


class Classifier(pl.LightningModule):
    """``log_metric``: the documented pattern; else ``update()`` only, reset as ``reset`` says
    (``None``: never, ``"start"``: at each validation epoch's start, ``"end"``: at its end,
    after logging its ``compute()``)."""

    def __init__(self, log_metric: bool = True, reset=None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=2)
        self.log_metric = log_metric
        self.reset = reset
        self.logged = []  # what Lightning computed for val_acc at each validation end

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        if self.log_metric:
            self.val_acc(logits, y)
            self.log("val_acc", self.val_acc)
        else:
            self.val_acc.update(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))

    def on_validation_epoch_start(self) -> None:
        if self.reset == "start":
            self.val_acc.reset()

    def on_validation_epoch_end(self) -> None:
        if self.reset == "end":
            self.log("val_acc", self.val_acc.compute())
            self.val_acc.reset()
        if not self.trainer.sanity_checking and self.log_metric:
            self.logged.append(self.trainer.callback_metrics.get("val_acc"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return loader(0)

    def val_dataloader(self):
        return loader(1)


def fit(model: Classifier, **kwargs) -> HookCallback:
    collect = HookCallback(final_ops={"acc": model.val_acc, "loss": "val_loss"})
    make_trainer(max_epochs=3, callbacks=[collect], **kwargs).fit(model)
    return collect


def test_each_validation_reports_its_own_value_and_the_end_of_fit_the_last_one() -> None:
    model = Classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "compute called before update"
        history = fit(model).final_ops_hook.final_ops_history
    assert [step for step, _ in history] == [4, 8, 12, 12]
    validations, end_of_fit = history[:3], history[3][1]
    for (_, values), expected in zip(validations, model.logged):
        assert torch.equal(values["acc"], expected)  # what Lightning logged for that epoch
    assert torch.equal(end_of_fit["acc"], history[2][1]["acc"])
    assert end_of_fit["acc"] > 0


@pytest.mark.parametrize("sanity", [0, 2])
def test_a_metric_never_reset_is_reset_when_each_validation_starts(caplog, sanity) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        never = fit(Classifier(log_metric=False), num_sanity_val_steps=sanity)
    torch.manual_seed(0)
    reset = fit(Classifier(log_metric=False, reset="start"), num_sanity_val_steps=sanity)
    assert "accumulates" not in caplog.text
    for (_, got), (_, expected) in zip(never.final_ops_hook.final_ops_history,
                                       reset.final_ops_hook.final_ops_history):
        assert got["acc"].item() == pytest.approx(expected["acc"].item())


def test_a_metric_the_training_step_updates_too_is_left_alone_and_named(caplog) -> None:
    class Shared(Classifier):  # one metric for training and validation: it accumulates
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.layer(x)
            self.val_acc.update(logits, y)
            return F.cross_entropy(logits, y)

    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        fit(Shared(log_metric=False))
    warnings_ = [r.getMessage() for r in caplog.records if "accumulates" in r.getMessage()]
    assert len(warnings_) == 1, warnings_  # by the hook that reads it, once
    assert warnings_[0].startswith("FinalOpsHook: final_ops['acc'] (MulticlassAccuracy) had 4 "
                                   "updates when this session began")


def test_a_model_metric_no_hook_reads_is_never_reset_only_named_if_it_accumulates(
        caplog) -> None:
    class Unread(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.train_acc.update(self.layer(x), y)  # a training metric: left alone
            return super().training_step(batch, batch_idx)

    model = Unread(log_metric=False)
    model.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=2)
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        make_trainer(max_epochs=2, callbacks=[HookCallback(
            evaluation_hooks=[FinalOpsHook({"loss": "val_loss"})])]).fit(model)
    named = [r.getMessage() for r in caplog.records if "accumulates" in r.getMessage()]
    assert named == ["HookCallback: the metric MulticlassAccuracy had 4 updates when this "
                     "evaluation started and was updated in it: its value accumulates across "
                     "evaluations. Reset it when an evaluation starts (TF re-initialised "
                     "metrics for each evaluation), or log it with self.log(name, metric) so "
                     "that Lightning resets it."]
    assert model.val_acc.update_count == 8  # the model's own: named, not reset
    assert model.train_acc.update_count == 8


def test_a_best_so_far_and_a_tracker_keep_their_values_across_validations(caplog) -> None:
    class Best(Classifier):
        def __init__(self) -> None:
            super().__init__(log_metric=False, reset="start")
            self.best = torchmetrics.MaxMetric()
            self.tracker = torchmetrics.MetricTracker(torchmetrics.MeanMetric(), maximize=True)

        def on_train_epoch_start(self) -> None:
            self.tracker.increment()

        def on_validation_epoch_end(self) -> None:
            acc = self.val_acc.compute()
            self.best.update(acc)
            if self.tracker.n_steps > 0:
                self.tracker.update(acc)

    model = Best()
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        history = fit_with(model, {"acc": model.val_acc, "best": model.best})
    accs = [float(values["acc"]) for _, values in history[:3]]
    assert [float(values["best"]) for _, values in history[:3]] == pytest.approx(
        [max(accs[:i + 1]) for i in range(3)])
    assert model.tracker.n_steps == 3
    assert [float(v) for v in model.tracker.compute_all()] == pytest.approx(accs)
    assert "accumulates" not in caplog.text


def fit_with(model, final_ops) -> list:
    collect = HookCallback(final_ops=final_ops)
    make_trainer(max_epochs=3, callbacks=[collect]).fit(model)
    return collect.final_ops_hook.final_ops_history


@pytest.mark.parametrize("sanity", [0, 2])
def test_the_documented_pattern_warns_about_nothing(caplog, sanity) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        fit(Classifier(), num_sanity_val_steps=sanity)
    assert "accumulates" not in caplog.text


def test_a_metric_reset_at_each_validation_start_is_fine(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        history = fit(Classifier(log_metric=False, reset="start")).final_ops_hook.final_ops_history
    assert "FinalOpsHook" not in caplog.text
    assert all(values["acc"] > 0 for _, values in history[:3])


def test_a_metric_reset_before_the_evaluation_ends_is_reported_not_replaced(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_finalops"):
        history = fit(Classifier(log_metric=False, reset="end")).final_ops_hook.final_ops_history
    assert "has no update at the end of the session" in caplog.text
    assert "fetch the value you logged by name" in caplog.text
    assert all(values["loss"] > 0 for _, values in history)  # the logged name is right
