"""HookCallback in a real Trainer: mapping, order, fetches, feeds, stop, exceptions, state."""

from __future__ import annotations

import csv
import glob
import logging
import os
from typing import Any, List

import pytest
import torch
from conftest import Counter
from lightning_models import PACKAGES, TinyModulePL, make_module_class, make_trainer, pl_package

from lightning_finalops import (
    CheckpointSaverHook,
    FinalOpsHook,
    HookCallback,
    SessionRunArgs,
    SessionRunHook,
    StopAtStepHook,
)


class Recorder(SessionRunHook):
    """Appends ``(tag, method, global_step)`` for every call."""

    def __init__(self, log: List[Any], tag: str = "H", fetches: Any = None) -> None:
        self.log, self.tag, self.fetches = log, tag, fetches
        self.results: List[Any] = []

    def begin(self) -> None:
        self.log.append((self.tag, "begin"))

    def after_create_session(self, session, coord) -> None:
        self.log.append((self.tag, "after_create_session", session.global_step))

    def before_run(self, run_context):
        self.log.append((self.tag, "before_run", run_context.session.global_step))
        return SessionRunArgs(self.fetches) if self.fetches is not None else None

    def after_run(self, run_context, run_values) -> None:
        self.log.append((self.tag, "after_run", run_context.session.global_step))
        self.results.append(run_values.results)

    def end(self, session) -> None:
        self.log.append((self.tag, "end", session.global_step))


def lightning_recorder(package: str, log: List[Any]):
    pl = pl_package(package)

    class LightningRecorder(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            log.append(("L", "on_train_start"))

        def on_train_end(self, trainer, pl_module):
            log.append(("L", "on_train_end"))

        def on_validation_start(self, trainer, pl_module):
            log.append(("L", "on_validation_start"))

        def on_validation_end(self, trainer, pl_module):
            log.append(("L", "on_validation_end"))

        def on_fit_end(self, trainer, pl_module):
            log.append(("L", "on_fit_end"))

    return LightningRecorder()


def methods(log: List[Any], tag: str = "H") -> List[str]:
    return [entry[1] for entry in log if entry[0] == tag]


@pytest.mark.parametrize("package", PACKAGES)
def test_fit_runs_training_and_evaluation_sessions_at_the_mapped_points(package: str) -> None:
    log: List[Any] = []
    callback = HookCallback(
        training_hooks=[Recorder(log, "T")], evaluation_hooks=[Recorder(log, "E")]
    )
    model = make_module_class(package)(n_train=4, n_val=4)
    callbacks = [callback, lightning_recorder(package, log)]
    trainer = make_trainer(package, max_epochs=1, callbacks=callbacks)
    trainer.fit(model)
    assert log == [
        ("T", "begin"),
        ("T", "after_create_session", 0),
        ("L", "on_train_start"),
        ("T", "before_run", 0),
        ("T", "after_run", 1),
        ("T", "before_run", 1),
        ("T", "after_run", 2),
        # the validation at the end of the epoch is a session of its own
        ("E", "begin"),
        ("E", "after_create_session", 2),
        ("L", "on_validation_start"),
        ("E", "before_run", 2),
        ("E", "after_run", 2),
        ("E", "before_run", 2),
        ("E", "after_run", 2),
        ("E", "end", 2),
        ("L", "on_validation_end"),
        ("T", "end", 2),
        ("L", "on_train_end"),
        ("L", "on_fit_end"),
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_hook_callback_is_a_callback_of_both_packages(package: str) -> None:
    assert isinstance(HookCallback(), pl_package(package).Callback)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_callback_hook_stays_callable_and_a_subclass_keeps_its_own(package: str) -> None:
    """Code that forwards a callback's hooks (a wrapper, a profiler) may call any of them."""
    seen: List[str] = []

    class Backward(HookCallback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            seen.append("on_after_backward")

    plain, sub = HookCallback(training_hooks=[Counter()]), Backward(name="sub")
    base = pl_package(package).Callback
    hooks = [n for n in vars(base) if n.startswith(("on_", "setup", "teardown"))]
    assert all(callable(getattr(plain, name)) for name in hooks)
    assert "on_after_backward" not in vars(plain)
    model = make_module_class(package)(n_train=4, n_val=4)
    trainer = make_trainer(package, max_epochs=1, callbacks=[plain, sub])
    trainer.fit(model)
    assert trainer.global_step == 2 and plain.training_hooks[0].runs == 2
    assert seen == ["on_after_backward"] * 2


def test_validate_test_and_predict_are_sessions_of_their_own() -> None:
    log: List[Any] = []
    callback = HookCallback(
        evaluation_hooks=[Recorder(log, "E")], prediction_hooks=[Recorder(log, "P")]
    )
    model = make_module_class()()
    trainer = make_trainer(callbacks=[callback])
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    trainer.predict(model)
    one_session = ["begin", "after_create_session", "before_run", "after_run", "before_run",
                   "after_run", "end"]
    assert methods(log, "E") == one_session * 2
    assert methods(log, "P") == one_session


def test_sanity_check_is_not_a_session_unless_asked_for() -> None:
    for include, sessions in ((False, 2), (True, 3)):
        log: List[Any] = []
        callback = HookCallback(evaluation_hooks=[Recorder(log)], include_sanity_check=include)
        trainer = make_trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[callback])
        trainer.fit(make_module_class()())
        assert methods(log).count("begin") == sessions
        assert methods(log).count("end") == sessions


def test_hook_fetch_names_resolve_from_step_outputs_then_callback_metrics() -> None:
    log: List[Any] = []
    hook = Recorder(log, fetches={"loss": "loss", "x_sum": "x_sum", "logged": "train_loss"})
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback([hook])])
    trainer.fit(make_module_class()(n_train=4))
    first = hook.results[0]
    assert set(first) == {"loss", "x_sum", "logged"}
    assert first["loss"].requires_grad is False
    assert torch.equal(first["loss"], first["logged"])  # the same step's loss, logged on_step


def test_unknown_fetch_name_raises_key_error_listing_known_names() -> None:
    hook = Recorder([], fetches="no_such_metric")
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback([hook])])
    with pytest.raises(KeyError, match=r"no_such_metric.*'loss'.*'x_sum'"):
        trainer.fit(make_module_class()(n_train=4))


class FeedHook(SessionRunHook):
    def __init__(self, feed_dict: Any) -> None:
        self.feed_dict = feed_dict

    def before_run(self, run_context):
        return SessionRunArgs(None, feed_dict=self.feed_dict)


def test_str_feeds_are_set_on_a_mapping_batch_before_the_step() -> None:
    model = make_module_class()(n_train=4, dict_batches=True)
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([FeedHook({"scale": 3.0})])])
    trainer.fit(model)
    assert model.seen_scale == [3.0, 3.0]


def test_str_feeds_with_a_tuple_batch_raise_a_clear_type_error() -> None:
    trainer = make_trainer(max_epochs=1, callbacks=[HookCallback([FeedHook({"scale": 3.0})])])
    with pytest.raises(TypeError, match="str feed keys.*batch is a list"):
        trainer.fit(make_module_class()(n_train=4))


def test_tensor_feeds_override_for_the_step_and_are_restored() -> None:
    model = make_module_class()(n_train=4)
    seen: List[torch.Tensor] = []

    class Spy(SessionRunHook):
        def after_run(self, run_context, run_values):
            seen.append(model.layer.bias.detach().clone())

    bias_before = model.layer.bias.detach().clone()
    # lr=0 keeps the weights fixed so the restored value is exactly the original one
    model.lr = 0.0
    hooks = [FeedHook({model.layer.bias: torch.full((1,), 7.0)}), Spy()]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback(hooks)])
    trainer.fit(model)
    assert torch.equal(model.layer.bias.detach(), bias_before)
    assert seen and all(torch.equal(value, bias_before) for value in seen)


def test_tensor_feed_is_in_effect_during_the_step() -> None:
    model = make_module_class()(n_train=2, n_val=2)
    fed = torch.zeros(1, 4)
    hook = Recorder([], fetches={"out": lambda: model.layer(torch.ones(1, 4))})
    callbacks = [HookCallback(evaluation_hooks=[FeedHook({model.layer.weight: fed}), hook])]
    trainer = make_trainer(max_epochs=1, callbacks=callbacks)
    trainer.fit(model)
    # during the run the weight is zero, so the output is the bias alone
    assert torch.allclose(hook.results[0]["out"], model.layer.bias.detach())
    assert not torch.equal(model.layer.weight.detach(), fed)


@pytest.mark.parametrize("package", PACKAGES)
def test_final_ops_in_evaluation_hooks_collect_every_validation(package: str) -> None:
    model = make_module_class(package)()
    hook = FinalOpsHook({"loss": "val_loss", "mean": model.val_mean_loss, "w": model.layer.weight})
    trainer = make_trainer(package, max_epochs=2, callbacks=[HookCallback(evaluation_hooks=[hook])])
    trainer.fit(model)
    assert [step for step, _ in hook.final_ops_history] == [4, 8]
    for _, values in hook.final_ops_history:
        # the logged epoch aggregate and the metric agree: both are the mean of the val losses
        assert torch.allclose(values["loss"], values["mean"])
    assert torch.equal(hook.final_ops_values["w"], model.layer.weight.detach())
    validated = trainer.validate(model, verbose=False)[0]["val_loss"]
    assert hook.final_ops_values["loss"].item() == pytest.approx(validated)


def test_final_ops_in_training_hooks_evaluate_at_the_end_of_fit() -> None:
    model = make_module_class()()
    hook = FinalOpsHook({"w": lambda: model.layer.weight.norm(), "last_loss": "train_loss"})
    trainer = make_trainer(max_epochs=2, callbacks=[HookCallback(training_hooks=[hook])])
    trainer.fit(model)
    assert [step for step, _ in hook.final_ops_history] == [8]
    assert hook.final_ops_values["w"].item() == pytest.approx(model.layer.weight.norm().item())
    assert torch.equal(hook.final_ops_values["last_loss"], trainer.callback_metrics["train_loss"])


def test_final_ops_argument_collects_at_every_validation_and_at_the_end_of_fit() -> None:
    callback = HookCallback(final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(make_module_class()())
    history = callback.final_ops_hook.final_ops_history
    assert [step for step, _ in history] == [4, 8, 8]  # two validations, then the end of fit
    assert torch.equal(history[-1][1]["loss"], history[-2][1]["loss"])
    assert callback.training_hooks == callback.evaluation_hooks == [callback.final_ops_hook]


def test_each_evaluation_is_written_to_the_loggers(tmp_path) -> None:
    pl = pl_package()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    callback = HookCallback(final_ops={"loss": "val_loss", "nested": ["val_loss"]})
    trainer = make_trainer(max_epochs=2, logger=logger, callbacks=[callback])
    trainer.fit(make_module_class()())
    (path,) = glob.glob(os.path.join(str(tmp_path), "run", "*", "metrics.csv"))
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("final_ops/val/loss")]
    assert [int(row["step"]) for row in rows] == [4, 8]
    history = callback.final_ops_hook.final_ops_history
    for row, (_, values) in zip(rows, history):
        assert float(row["final_ops/val/loss"]) == pytest.approx(values["loss"].item())
        assert float(row["final_ops/val/nested/0"]) == pytest.approx(values["loss"].item())


class StopAt(SessionRunHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_run(self, run_context, run_values) -> None:
        if run_context.session.global_step >= self.step:
            run_context.request_stop()


def test_request_stop_in_a_training_hook_stops_fit_after_the_current_batch() -> None:
    log: List[Any] = []
    callback = HookCallback(training_hooks=[StopAt(3), Recorder(log)])
    trainer = make_trainer(max_epochs=5, limit_val_batches=0, callbacks=[callback])
    trainer.fit(make_module_class()())
    assert trainer.global_step == 3
    # every after_run of the stopping batch fired, then end() once
    assert methods(log)[-3:] == ["before_run", "after_run", "end"]
    assert methods(log).count("end") == 1


def test_request_stop_in_an_evaluation_hook_ends_that_evaluation_after_the_batch() -> None:
    log: List[Any] = []

    class StopFirst(SessionRunHook):
        def after_run(self, run_context, run_values) -> None:
            run_context.request_stop()

    recorder = Recorder(log, fetches="val_loss")
    final = FinalOpsHook({"loss": "val_loss"})
    callback = HookCallback(evaluation_hooks=[StopFirst(), recorder, final])
    trainer = make_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(make_module_class()(n_val=6))
    one_batch = ["begin", "after_create_session", "before_run", "after_run", "end"]
    assert methods(log) == one_batch * 2  # each validation ended after its first batch
    assert trainer.global_step == 8  # training itself was not stopped
    # the batch that requested the stop counts in full: the epoch value is that batch's loss
    for batch_loss, (_, values) in zip(recorder.results, final.final_ops_history):
        assert torch.allclose(values["loss"], batch_loss)


def test_end_runs_once_when_lightning_skips_on_train_end() -> None:
    log: List[Any] = []
    pl = pl_package()

    class StopBeforeTraining(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.should_stop = True

    callback = HookCallback(training_hooks=[Recorder(log)])
    trainer = make_trainer(callbacks=[StopBeforeTraining(), callback])
    trainer.fit(make_module_class()())
    assert methods(log) == ["begin", "after_create_session", "end"]


def test_an_exception_skips_every_end_and_restores_fed_tensors() -> None:
    log: List[Any] = []
    model = make_module_class()(n_train=4)
    bias_before = model.layer.bias.detach().clone()

    class Boom(SessionRunHook):
        def after_run(self, run_context, run_values) -> None:
            raise ValueError("boom")

    final = FinalOpsHook(model.layer.weight)
    hooks = [FeedHook({model.layer.bias: torch.full((1,), 7.0)}), Recorder(log), Boom(), final]
    model.lr = 0.0
    trainer = make_trainer(callbacks=[HookCallback(training_hooks=hooks)])
    with pytest.raises(ValueError, match="boom"):
        trainer.fit(model)
    assert "end" not in methods(log)
    assert final.final_ops_values is None
    assert torch.equal(model.layer.bias.detach(), bias_before)


@pytest.mark.parametrize("package", PACKAGES)
def test_hook_state_is_checkpointed_and_restored_on_resume(tmp_path, package: str) -> None:
    first, second = Counter(), Counter(name="2")
    trainer = make_trainer(package, max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([first, second])])
    model = make_module_class(package)()
    trainer.fit(model)
    ckpt = str(tmp_path / "one_epoch.ckpt")
    trainer.save_checkpoint(ckpt)
    assert first.runs == second.runs == 4

    resumed_first, resumed_second = Counter(), Counter(name="2")
    trainer = make_trainer(package, max_epochs=2, limit_val_batches=0,
                           callbacks=[HookCallback([resumed_first, resumed_second])])
    trainer.fit(make_module_class(package)(), ckpt_path=ckpt)
    assert resumed_first.seen_at_creation == [4]  # after_create_session sees the restored step
    assert resumed_first.runs == resumed_second.runs == 8
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (key,) = [k for k in saved if k.startswith("HookCallback")]
    assert saved[key] == {"hooks": {"Counter": {"runs": 4}, "Counter[2]": {"runs": 4}}}


def test_two_hook_callbacks_with_names_keep_separate_state(tmp_path) -> None:
    a, b = Counter(), Counter()
    callbacks = [HookCallback([a], name="a"), HookCallback([b], name="b")]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert saved["HookCallback[a]"] == saved["HookCallback[b]"] == {
        "hooks": {"Counter": {"runs": 2}}
    }


def test_a_stateless_hook_added_on_resume_keeps_the_state_key_and_the_state(tmp_path) -> None:
    counter = Counter()
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback([counter])])
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed = Counter()
    callback = HookCallback([SessionRunHook(), resumed, SessionRunHook()])
    assert callback.state_key == HookCallback([counter]).state_key
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)
    assert resumed.runs == 4  # 2 restored + 2 run


def test_a_stateful_hook_added_on_resume_starts_fresh_and_a_removed_one_is_an_error(
    tmp_path,
) -> None:
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback([Counter()])])
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed, added = Counter(), Counter(name="added")
    trainer = make_trainer(max_epochs=2, limit_val_batches=0,
                           callbacks=[HookCallback([resumed, added], final_ops={"x": "loss"})])
    trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)
    assert (resumed.runs, added.runs) == (4, 2)

    trainer = make_trainer(max_epochs=2, limit_val_batches=0,
                           callbacks=[HookCallback([SessionRunHook()])])
    with pytest.raises(ValueError, match=r"hook state under \['HookCallback\{Counter\}'\]"):
        trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)


def test_a_final_ops_hook_added_before_the_existing_one_on_resume_gets_none_of_its_state(
    tmp_path,
) -> None:
    callback = HookCallback(final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = list(callback.final_ops_hook.final_ops_history)
    assert [step for step, _ in saved] == [4, 4]  # the validation, then the end of fit

    model = make_module_class()()
    added = FinalOpsHook({"mse": model.val_sample_mse})
    resumed = HookCallback(evaluation_hooks=[added], final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=2, callbacks=[resumed])
    trainer.fit(model, ckpt_path=ckpt)
    history = resumed.final_ops_hook.final_ops_history
    assert [step for step, _ in history] == [4, 4, 8, 8]
    assert torch.equal(history[0][1]["loss"], saved[0][1]["loss"])
    assert [step for step, _ in added.final_ops_history] == [8]  # its own, from the resume


def test_two_unnamed_callbacks_keep_and_restore_their_own_state(tmp_path) -> None:
    first, second = Counter(), FinalOpsHook({"w": lambda: 1}, name="w")
    callbacks = [HookCallback([first]), HookCallback([second])]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    assert sorted(torch.load(ckpt, weights_only=False)["callbacks"]) == [
        "HookCallback{Counter}", "HookCallback{FinalOpsHook[w]}",
    ]
    # resumed in the other order, one of them with a stateful hook added
    resumed_second, resumed_first, added = FinalOpsHook({"w": lambda: 1}, name="w"), Counter(), \
        FinalOpsHook({"x": lambda: 2})
    callbacks = [HookCallback([resumed_second]), HookCallback([resumed_first, added])]
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)
    assert resumed_first.runs == 4  # 2 restored (found under its old key) + 2 run
    assert [step for step, _ in resumed_second.final_ops_history] == [2, 4]
    assert [step for step, _ in added.final_ops_history] == [4]


def test_one_hook_object_in_two_callbacks_is_refused() -> None:
    shared = Counter()
    trainer = make_trainer(callbacks=[HookCallback([shared]),
                                      HookCallback([SessionRunHook(), shared], name="b")])
    with pytest.raises(ValueError, match=r"share hook objects \['Counter'\]"):
        trainer.fit(make_module_class()())
    assert shared.runs == 0


def test_two_unnamed_callbacks_with_the_same_hooks_are_refused_when_the_trainer_is_built():
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        make_trainer(callbacks=[HookCallback([Counter()]), HookCallback([Counter()])])


def test_a_resume_that_cannot_tell_two_edited_unnamed_callbacks_apart_says_so(tmp_path) -> None:
    callbacks = [
        HookCallback([Counter()]), HookCallback([Counter(), FinalOpsHook("loss", name="x")]),
    ]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    edited = [HookCallback([Counter(), FinalOpsHook("loss", name="y")])]
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=edited)
    with pytest.raises(ValueError, match="several HookCallbacks .* a name="):
        trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)


def test_hook_state_that_no_callback_can_take_is_an_error_not_a_silent_loss(tmp_path) -> None:
    trainer = make_trainer(max_epochs=1, limit_val_batches=0,
                           callbacks=[HookCallback([Counter()], name="old")])
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    for renamed in (HookCallback([Counter()], name="new"), HookCallback([SessionRunHook()])):
        trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[renamed])
        with pytest.raises(ValueError, match=r"hook state under \['HookCallback\[old\]'\]"):
            trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)


def test_a_callback_without_stateful_hooks_takes_no_other_callbacks_state(tmp_path) -> None:
    class PerRun(SessionRunHook):
        def after_run(self, run_context, run_values):
            pass

    counter = Counter()
    callbacks = [HookCallback([counter]), HookCallback([PerRun()])]
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4))
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = Counter()
    callbacks = [HookCallback([resumed, FinalOpsHook({"w": lambda: 1})]), HookCallback([PerRun()])]
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(make_module_class()(n_train=4), ckpt_path=ckpt)
    assert resumed.runs == 4


def test_a_callback_without_stateful_hooks_writes_no_state() -> None:
    assert HookCallback([SessionRunHook()]).state_dict() == {}


def test_loading_state_into_different_hooks_is_an_error() -> None:
    callback = HookCallback([Counter()])
    with pytest.raises(ValueError, match="same hooks"):
        callback.load_state_dict({"hooks": {"Other": {"runs": 3}}})


def test_constructor_rejects_what_is_not_a_hook() -> None:
    with pytest.raises(TypeError, match=r"evaluation_hooks\[1\] must be a SessionRunHook"):
        HookCallback(evaluation_hooks=[FinalOpsHook(None), "val_loss"])
    with pytest.raises(TypeError, match="training_hooks must be a list"):
        HookCallback(training_hooks=FinalOpsHook(None))
    with pytest.raises(TypeError, match=r"final_ops\['a'\]"):
        HookCallback(final_ops={"a": 3})


def test_ddp_spawn_with_final_ops_hook_raises_a_clear_error() -> None:
    callback = HookCallback(final_ops={"loss": "val_loss"})
    trainer = make_trainer(strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[callback])
    with pytest.raises(Exception, match="strategy='ddp'"):
        trainer.fit(TinyModulePL())


def test_request_stop_in_a_prediction_hook_ends_that_prediction_after_the_batch() -> None:
    log: List[Any] = []

    class StopFirst(SessionRunHook):
        def after_run(self, run_context, run_values) -> None:
            run_context.request_stop()

    trainer = make_trainer(callbacks=[HookCallback(prediction_hooks=[StopFirst(), Recorder(log)])])
    predictions = trainer.predict(make_module_class()())
    assert len(predictions) == 1
    assert methods(log) == ["begin", "after_create_session", "before_run", "after_run", "end"]


def test_prediction_hooks_fetch_names_from_predict_step_outputs() -> None:
    hook = Recorder([], fetches="prediction")
    trainer = make_trainer(callbacks=[HookCallback(prediction_hooks=[hook])])
    predictions = trainer.predict(make_module_class()())
    assert [r.shape for r in hook.results] == [(2, 1), (2, 1)]
    assert torch.equal(hook.results[0], predictions[0]["prediction"])


def test_a_second_fit_is_a_new_training_session() -> None:
    log: List[Any] = []
    callback = HookCallback(training_hooks=[Recorder(log)])
    model = make_module_class()(n_train=4)
    make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(model)
    make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(model)
    assert methods(log).count("begin") == methods(log).count("end") == 2


def test_a_trace_request_profiles_the_batch_under_lightning(tmp_path) -> None:
    from lightning_finalops import RunOptions

    traced: List[Any] = []

    class Trace(SessionRunHook):
        def before_run(self, run_context):
            return SessionRunArgs(None, options=RunOptions(trace_level=RunOptions.FULL_TRACE))

        def after_run(self, run_context, run_values) -> None:
            traced.append(run_values.run_metadata.profile)

    trainer = make_trainer(max_epochs=1, limit_val_batches=0, limit_train_batches=1,
                           callbacks=[HookCallback([Trace()])])
    trainer.fit(make_module_class()())
    (profile,) = traced
    names = {event.name for event in profile.events()}
    assert any("linear" in name or "addmm" in name for name in names)


def test_rerunning_a_finished_fit_is_a_no_op_that_keeps_the_restored_history(
    tmp_path, caplog
) -> None:
    callback = HookCallback(final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_steps=4, max_epochs=-1, callbacks=[callback])
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "done.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = [step for step, _ in callback.final_ops_hook.final_ops_history]

    for _ in range(2):  # every time, not only once
        again = HookCallback(final_ops={"loss": "val_loss"})
        trainer = make_trainer(max_steps=4, max_epochs=-1, callbacks=[again])
        with caplog.at_level(logging.INFO, logger="lightning_finalops"):
            trainer.fit(make_module_class()(), ckpt_path=ckpt)
        assert [step for step, _ in again.final_ops_hook.final_ops_history] == saved == [4, 4]
    assert "Training had already finished at global step 4" in caplog.text


def test_stop_at_step_hook_restored_past_its_last_step_stops_fit_before_any_batch(
    tmp_path,
) -> None:
    counter = Counter()
    trainer = make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[HookCallback([counter])])
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = Counter()
    callback = HookCallback([StopAtStepHook(last_step=3), resumed])
    trainer = make_trainer(max_epochs=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(make_module_class()(), ckpt_path=ckpt)
    assert trainer.global_step == 4 and resumed.runs == 4  # restored 4, ran none


def test_a_resume_from_a_save_point_keeps_the_validation_that_followed_it(tmp_path) -> None:
    ckpt_dir = tmp_path / "ckpt"

    def fit(ckpt_path=None):
        callback = HookCallback(training_hooks=[CheckpointSaverHook(ckpt_dir, save_steps=4)],
                                final_ops={"loss": "val_loss"})
        make_trainer(max_epochs=3, callbacks=[callback]).fit(make_module_class()(),
                                                            ckpt_path=ckpt_path)
        return callback.final_ops_hook.final_ops_history

    uninterrupted = fit()
    assert [step for step, _ in uninterrupted] == [4, 8, 12, 12]
    # as after a crash at step 10: resume from the checkpoint of step 8, which was written
    # again after the validation Lightning ran right after that batch
    resumed = fit(ckpt_path=str(ckpt_dir / "model.ckpt-8"))
    assert [step for step, _ in resumed] == [4, 8, 12, 12]
    for (_, a), (_, b) in zip(resumed[:2], uninterrupted[:2]):
        assert torch.equal(a["loss"], b["loss"])


def test_stop_at_step_hook_restored_at_its_last_step_makes_fit_a_no_op(tmp_path) -> None:
    callback = HookCallback([StopAtStepHook(last_step=4)], final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=5, callbacks=[callback])
    trainer.fit(make_module_class()())
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    saved = [step for step, _ in callback.final_ops_hook.final_ops_history]
    again = HookCallback([StopAtStepHook(last_step=4)], final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_epochs=5, callbacks=[again])
    trainer.fit(make_module_class()(), ckpt_path=ckpt)  # no KeyError: no end() ran
    assert [step for step, _ in again.final_ops_hook.final_ops_history] == saved


def test_a_checkpoint_is_not_written_again_once_a_run_moved_the_loop_on(tmp_path) -> None:
    # with gradient accumulation, batches run without advancing the global step: the
    # checkpoint of a step must keep the loop position it was written at
    ckpt_dir = tmp_path / "ckpt"
    callback = HookCallback(training_hooks=[CheckpointSaverHook(ckpt_dir, save_steps=1)],
                            final_ops={"loss": "val_loss"})
    trainer = make_trainer(max_steps=2, max_epochs=-1, accumulate_grad_batches=3,
                           val_check_interval=2, callbacks=[callback])
    trainer.fit(make_module_class()(n_train=16))
    completed = [
        torch.load(ckpt_dir / f"model.ckpt-{step}", weights_only=False)["loops"]["fit_loop"][
            "epoch_loop.batch_progress"]["total"]["completed"]
        for step in (0, 1)
    ]
    assert completed == [0, 2]  # as written at the step's last batch (its 3rd), never later
