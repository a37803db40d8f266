"""``InMemoryEvaluatorHook``: TF's ``hooks_test.py`` scenarios, plus the session rules."""

from __future__ import annotations

import collections.abc

import pytest
import torch
import torchmetrics
from torch import nn

from lightning_finalops import (
    FinalOpsHook,
    InMemoryEvaluatorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    SessionRunArgs,
    SessionRunHook,
    StopAtStepHook,
    read_eval_metrics,
    stop_if_no_decrease_hook,
)


def train(hooks, steps: int, modules=None, step=lambda: None) -> int:
    modules = nn.Identity() if modules is None else modules  # an evaluation needs modules
    with MonitoredSession([*hooks, StopAtStepHook(last_step=steps)], modules=modules) as sess:
        while not sess.should_stop():
            sess.run(step)
        return sess.global_step


def history(evaluator) -> list:
    return [(step, {k: float(v) for k, v in values.items()})
            for step, values in evaluator.evaluation_history]


# -- TF's hooks_test.py ------------------------------------------------------------------------
def test_runs_eval_metrics_before_training_every_n_iter_and_at_end() -> None:
    """TF L68: 10 steps, every_n_iter=4: evaluations at global steps 0, 4, 8 and 10."""
    mean = torchmetrics.MeanMetric()
    evaluator = InMemoryEvaluatorHook(
        lambda batch: mean.update(float(batch)), lambda: range(10),
        hooks=[FinalOpsHook({"mean_of_features": mean})], every_n_iter=4,
    )
    train([evaluator], 10)
    assert history(evaluator) == [(step, {"mean_of_features": 4.5}) for step in (0, 4, 8, 10)]


def test_uses_the_latest_variable_values() -> None:
    """TF L111: the train step sets w = global step + 2; each evaluation sees it then."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    steps = []

    def train_step() -> None:
        with torch.no_grad():
            model.weight.fill_(len(steps) + 1 + 2)  # the global step after this run, + 2
        steps.append(1)

    evaluator = InMemoryEvaluatorHook(
        lambda batch: {"w": model(torch.ones(1, 1)).squeeze()}, lambda: range(3),
        every_n_iter=4,
    )
    train([evaluator], 10, modules=model, step=train_step)
    assert history(evaluator) == [(0, {"w": 0.0}), (4, {"w": 6.0}), (8, {"w": 10.0}),
                                  (10, {"w": 12.0})]


def test_named_evaluation_writes_eval_name_and_equals_a_separate_evaluation(tmp_path) -> None:
    """TF L160: name='in-memory' → eval_in-memory; its final metrics equal an evaluation of
    the trained model run afterwards on its own."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(5)]
    mse = torchmetrics.MeanSquaredError()

    def eval_step(batch):
        x, y = batch
        mse.update(model(x), y)
        return {"loss": nn.functional.mse_loss(model(x), y)}

    def train_step():
        x, y = data[0]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: data, hooks=[FinalOpsHook({"mse": mse})],
                                      name="in-memory", every_n_iter=3,
                                      output_dir=str(tmp_path))
    train([evaluator], 7, modules=model, step=train_step)
    assert evaluator.eval_dir == str(tmp_path / "eval_in-memory")
    written = read_eval_metrics(evaluator.eval_dir)
    assert list(written) == [0, 3, 6, 7]
    final_step, final = evaluator.evaluation_history[-1]
    assert written[7] == pytest.approx({k: float(v) for k, v in final.items()})
    mse.reset()
    with torch.no_grad():
        for batch in data:
            eval_step(batch)
    assert float(final["mse"]) == pytest.approx(float(mse.compute()))
    assert float(final["mse"]) == pytest.approx(float(final["loss"]))  # equal batch sizes


@pytest.mark.parametrize("every_n_iter", [0, -1, None])
def test_invalid_every_n_iter(every_n_iter) -> None:
    with pytest.raises(ValueError, match=f"invalid every_n_iter={every_n_iter}."):
        InMemoryEvaluatorHook(lambda b: None, lambda: [], every_n_iter=every_n_iter)


@pytest.mark.parametrize("steps", [0, -3])
def test_invalid_steps(steps) -> None:
    with pytest.raises(ValueError, match=f"Must specify steps > 0, given: {steps}"):
        InMemoryEvaluatorHook(lambda b: None, lambda: [], steps=steps)


def test_hooks_must_be_session_run_hooks() -> None:
    with pytest.raises(TypeError, match="Hooks must be a SessionRunHook, given: 3"):
        InMemoryEvaluatorHook(lambda b: None, lambda: [], hooks=[3])
    with pytest.raises(TypeError, match="eval_step must be callable"):
        InMemoryEvaluatorHook(None, lambda: [])
    with pytest.raises(TypeError, match="input_fn must be callable"):
        InMemoryEvaluatorHook(lambda b: None, [1, 2])


# -- each evaluation is a session for its hooks -------------------------------------------------
class Recorder(SessionRunHook):
    def __init__(self, stop_after=None) -> None:
        self.calls, self.stop_after, self.results = [], stop_after, []

    def begin(self):
        self.calls.append("begin")

    def after_create_session(self, session, coord):
        self.calls.append(("create", session.global_step))

    def before_run(self, run_context):
        self.calls.append(("before", run_context.session.global_step))
        return SessionRunArgs("twice")

    def after_run(self, run_context, run_values):
        self.calls.append(("after", run_context.session.global_step))
        self.results.append(float(run_values.results))
        if self.stop_after is not None and len(self.results) == self.stop_after:
            run_context.request_stop()

    def end(self, session):
        self.calls.append(("end", session.global_step))


def test_each_evaluation_is_a_full_session_at_the_fixed_training_step() -> None:
    recorder = Recorder()
    evaluator = InMemoryEvaluatorHook(lambda b: {"twice": torch.tensor(2.0 * b)},
                                      lambda: range(2), hooks=[recorder], every_n_iter=3)
    train([evaluator], 3)
    one = lambda step: ["begin", ("create", step), ("before", step), ("after", step),  # noqa: E731
                        ("before", step), ("after", step), ("end", step)]
    assert recorder.calls == one(0) + one(3) + one(3)  # before training, every 3, at the end
    assert recorder.results == [0.0, 2.0] * 3


def test_a_stop_in_an_evaluation_hook_ends_that_evaluation_only() -> None:
    recorder = Recorder(stop_after=1)
    seen = []
    evaluator = InMemoryEvaluatorHook(lambda b: seen.append(b) or {"twice": torch.tensor(0.0)},
                                      lambda: range(5), hooks=[recorder], every_n_iter=100)
    assert train([evaluator], 4) == 4  # training went on
    # the first evaluation stopped after its first batch; the one at the end (the recorder
    # stops at its first result only) ran them all
    assert seen == [0, 0, 1, 2, 3, 4]


def test_steps_limits_the_batches() -> None:
    seen = []
    evaluator = InMemoryEvaluatorHook(seen.append, lambda: iter(range(10)), steps=3,
                                      every_n_iter=100)
    train([evaluator], 1)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_eval_mode_and_no_grad_during_evaluation_then_restored() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()  # a submodule the user keeps in eval mode stays so
    modes = []

    def eval_step(batch):
        modes.append((model.training, model[0].training, torch.is_grad_enabled()))

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [0], every_n_iter=100)
    train([evaluator], 2, modules=model)
    assert modes == [(False, False, False)] * 2
    assert model.training and model[0].training and not model[1].training
    assert torch.is_grad_enabled()


def test_metrics_are_reset_when_each_evaluation_starts() -> None:
    total = torchmetrics.SumMetric()
    evaluator = InMemoryEvaluatorHook(lambda b: total.update(b), lambda: [1.0, 2.0],
                                      hooks=[FinalOpsHook({"total": total})], every_n_iter=1)
    train([evaluator], 2)
    assert [v["total"] for _, v in history(evaluator)] == [3.0, 3.0, 3.0, 3.0]


# The NER tagger's pattern: an F1 computed from a confusion matrix inside a function, the
# matrix updated by the eval step; neither is itself a fetch.
_confusion = torchmetrics.ConfusionMatrix(task="binary")


def _f1() -> torch.Tensor:
    (_, fp), (fn, tp) = _confusion.compute().float()
    return 2 * tp / (2 * tp + fp + fn)


def test_a_metric_reached_only_through_functions_is_reset_when_each_evaluation_starts() -> None:
    predictions = iter([1, 1, 0, 0, 1, 0, 0, 0] * 4)

    def eval_step(batch):
        _confusion.update(torch.tensor([next(predictions)]), torch.tensor([1]))

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [0, 1], every_n_iter=1,
                                      hooks=[FinalOpsHook({"f1": _f1})])
    train([evaluator], 3)
    # each evaluation (at creation, after each run, at the end) sees its own two predictions:
    # (1, 1), (0, 0), (1, 0), (0, 0), (1, 1)
    assert [v["f1"] for _, v in history(evaluator)] == pytest.approx([1, 0, 2 / 3, 0, 1])
    assert _confusion.update_count == 2


def test_a_training_metric_of_the_evaluated_model_is_left_alone_and_a_shared_one_named(
        caplog) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.train_total = torchmetrics.SumMetric()
            self.eval_total = torchmetrics.SumMetric()

    model = Model()

    def step():
        model.train_total.update(1.0)

    evaluator = InMemoryEvaluatorHook(lambda b: model.eval_total.update(b), lambda: [1.0],
                                      every_n_iter=1, modules=model)
    with caplog.at_level("WARNING", logger="lightning_finalops"):
        train([evaluator], 3, modules=model, step=step)
    assert model.train_total.update_count == 3  # training's updates: never reset
    assert model.eval_total.update_count == 1  # reset at each evaluation's start
    assert "accumulates" not in caplog.text
    shared = InMemoryEvaluatorHook(lambda b: model.train_total.update(b), lambda: [1.0],
                                   every_n_iter=1, modules=model)
    with caplog.at_level("WARNING", logger="lightning_finalops"):
        train([shared], 3, modules=model, step=step)
    assert caplog.text.count("accumulates across evaluations") == 1
    assert "InMemoryEvaluatorHook: the metric SumMetric had" in caplog.text


def test_a_new_final_ops_hook_per_evaluation_session_names_a_metric_never_reset(caplog) -> None:
    total = torchmetrics.SumMetric()
    values = []
    with caplog.at_level("WARNING", logger="lightning_finalops"):
        for _ in range(3):  # Estimator.evaluate called three times, the metric never reset
            hook = FinalOpsHook({"total": total})
            with MonitoredSession([hook, StopAtStepHook(num_steps=2)]) as sess:
                while not sess.should_stop():
                    sess.run(lambda: total.update(1.0))
            values.append(float(hook.final_ops_values["total"]))
    assert values == [2.0, 4.0, 6.0]  # a plain session does not know it evaluates: named
    assert caplog.text.count("it was not reset, so its value accumulates") == 1
    assert "final_ops['total'] (SumMetric) had 2 updates when this session began" in caplog.text


def test_an_exception_in_an_evaluation_propagates_without_end() -> None:
    recorder = Recorder()
    model = nn.Linear(1, 1)

    def eval_step(batch):
        if batch == 1:
            raise RuntimeError("bad batch")
        return {"twice": torch.tensor(0.0)}

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: range(3), hooks=[recorder])
    with pytest.raises(RuntimeError, match="bad batch"):
        train([evaluator], 2, modules=model)
    assert "end" not in [c if isinstance(c, str) else c[0] for c in recorder.calls]
    assert model.training  # back in train mode


def test_a_stop_iteration_in_eval_step_ends_that_evaluation_not_training() -> None:
    recorder = Recorder()

    def eval_step(batch):
        if batch == 1:
            raise StopIteration  # e.g. next() on an exhausted iterator inside the step
        return {"twice": torch.tensor(2.0 * batch)}

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: range(3), hooks=[recorder],
                                      every_n_iter=2)
    assert train([evaluator], 10) == 10  # training went on to its end
    assert [s for s, _ in evaluator.evaluation_history] == [0, 2, 4, 6, 8, 10, 10]
    assert recorder.calls.count(("end", 10)) == 2  # each evaluation ended cleanly


def test_each_returned_name_is_averaged_over_the_batches_that_returned_it() -> None:
    evaluator = InMemoryEvaluatorHook(
        lambda b: {"loss": torch.tensor(float(b)), **({"acc": 1.0} if b == 0 else {})},
        lambda: range(4), every_n_iter=100)
    train([evaluator], 1)
    assert history(evaluator)[0] == (0, {"loss": 1.5, "acc": 1.0})


def test_modules_that_are_not_modules_are_refused() -> None:
    with pytest.raises(TypeError, match="modules must be a torch.nn.Module"):
        InMemoryEvaluatorHook(print, list, modules=iter([nn.Linear(1, 1)]))
    with pytest.raises(TypeError, match="name must be a str"):
        InMemoryEvaluatorHook(print, list, name=3)
    with pytest.raises(TypeError, match="every_n_iter must be an int"):
        InMemoryEvaluatorHook(print, list, every_n_iter="3")
    hook = Recorder()
    with pytest.raises(ValueError, match="same Recorder object"):
        InMemoryEvaluatorHook(print, list, hooks=[hook, hook])


def test_in_a_lightning_fit_on_the_lightning_module() -> None:
    from lightning_models import make_module_class, make_trainer

    from lightning_finalops import HookCallback

    model = make_module_class()(n_train=8)
    modes = []

    def eval_step(batch):
        x, y = batch
        modes.append((model.training, torch.is_grad_enabled()))
        return {"loss": nn.functional.mse_loss(model.layer(x), y)}

    data = [(torch.randn(2, 4), torch.randn(2, 1))]
    evaluator = InMemoryEvaluatorHook(eval_step, lambda: data, every_n_iter=3)
    make_trainer(max_steps=7, max_epochs=-1, limit_val_batches=0,
                 callbacks=[HookCallback(training_hooks=[evaluator])]).fit(model)
    assert [s for s, _ in evaluator.evaluation_history] == [0, 3, 6, 7]
    assert set(modes) == {(False, False)}


# -- with early stopping and checkpoints ---------------------------------------------------------
def test_early_stopping_on_the_evaluator_history() -> None:
    values = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    current = []
    evaluator = InMemoryEvaluatorHook(lambda b: {"loss": torch.tensor(current[-1])},
                                      lambda: [current.append(next(values))], every_n_iter=2)
    stopper = stop_if_no_decrease_hook(evaluator, "loss", 4, run_every_secs=None,
                                       run_every_steps=1)
    # evaluations at steps 0 (1.0), 2 (0.5), 4, 6 (0.7): 6 - 2 >= 4 stops at step 6
    assert train([evaluator, stopper], 100) == 6
    assert stopper.stopped


def test_the_history_is_checkpointed_and_restored(tmp_path) -> None:
    def session(hooks):
        return MonitoredTrainingSession(checkpoint_dir=str(tmp_path), hooks=hooks,
                                        save_checkpoint_steps=1)

    evaluator = InMemoryEvaluatorHook(lambda b: {"x": torch.tensor(1.0)}, lambda: [0],
                                      every_n_iter=2, modules=nn.Identity())
    with session([evaluator, StopAtStepHook(last_step=3)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    resumed = InMemoryEvaluatorHook(lambda b: {"x": torch.tensor(1.0)}, lambda: [0],
                                    every_n_iter=2, modules=nn.Identity())
    with session([resumed, StopAtStepHook(last_step=4)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    assert [step for step, _ in resumed.evaluation_history] == [0, 2, 3, 3, 4]


# -- the session rules (the core runs the evaluation) -------------------------------------------
def test_an_evaluation_with_no_module_anywhere_is_refused_at_creation() -> None:
    evaluator = InMemoryEvaluatorHook(lambda b: None, lambda: [0])
    with pytest.raises(ValueError, match=r"pass modules="):
        MonitoredSession([evaluator])
    assert evaluator.evaluation_history == []


def test_an_evaluation_in_a_session_given_modules_runs_them_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    stats = model[2].running_mean.clone()
    seen = []

    def eval_step(batch):
        seen.append((model.training, model[1].training, torch.is_grad_enabled()))
        model(torch.randn(4, 2))

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [0, 1], every_n_iter=100)
    train([evaluator], 2, modules=model)
    assert seen and all(s == (False, False, False) for s in seen)
    assert torch.equal(model[2].running_mean, stats)  # no statistics from evaluation data
    assert model.training


def test_a_tensor_the_eval_step_updates_in_place_is_averaged_by_value() -> None:
    state = torch.zeros(())

    def eval_step(batch):
        state.add_(1.0)  # 1, 2, 3: the mean is 2, whatever the step does to it afterwards
        return {"x": state}

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [0, 1, 2], every_n_iter=100)
    train([evaluator], 1)
    assert history(evaluator)[0] == (0, {"x": 2.0})


class _LazyTable(collections.abc.Mapping):  # a dataset-like mapping: reading loads
    reads = 0

    def __getitem__(self, key):
        _LazyTable.reads += 1
        return key

    def __iter__(self):
        return iter(range(1000))

    def __len__(self):
        return 1000


_TABLE = _LazyTable()


class _Proxy:  # an object whose attributes fail until something initialises it (wandb-like)
    def __getattr__(self, name):
        raise RuntimeError("not initialised")


_PROXY = _Proxy()


def test_what_an_eval_step_names_is_searched_without_reading_it_or_breaking_the_evaluation():
    def eval_step(batch):
        return {"x": batch + len(_TABLE) * 0 + (0 if _PROXY is None else 0)}

    evaluator = InMemoryEvaluatorHook(eval_step, lambda: [torch.ones(())], every_n_iter=1)
    train([evaluator], 3)
    assert [v["x"] for _, v in history(evaluator)] == [1.0] * 5
    assert _LazyTable.reads == 0  # no item of a mapping other than a dict is read
