"""docs/migration/: the migration guide's structure (tests/test_docs.py runs its blocks).

Blocks fenced ```` ```python ```` run (tests/test_docs.py runs each page's blocks in order in
one fresh process); blocks fenced ```` ```python tf1 ```` are TensorFlow 1 code and never
run (TensorFlow is not installed). This file checks what the pages must hold: every task
page, runnable code on each, and every TF name shown in TF1 code and ported by name.
"""

from __future__ import annotations

import os
import re

import pytest

import lightning_finalops

GUIDE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "migration"
)

# The pages the site's navigation lists, one task each.
TASK_PAGES = [
    "train.md", "evaluate-and-predict.md", "train-and-evaluate.md", "checkpoints.md",
    "summaries-and-logging.md", "feeds.md", "profiling.md", "many-processes.md",
    "differences-that-change-your-numbers.md",
]
PAGES = ["start-here.md", *TASK_PAGES, "appendix-hooks.md"]

# Every TF1 / tf.estimator name the guide ports. Each must appear in the TF1 code it shows.
TF_NAMES = [
    "SessionRunHook", "SessionRunArgs", "request_stop", "MonitoredSession",
    "MonitoredTrainingSession",
    "LoggingTensorHook", "StopAtStepHook", "NanTensorHook", "CheckpointSaverHook",
    "CheckpointSaverListener", "SummarySaverHook", "StepCounterHook", "GlobalStepWaiterHook",
    "FeedFnHook", "ProfilerHook", "FinalOpsHook", "SecondOrStepTimer",
    "stop_if_higher_hook", "stop_if_lower_hook", "stop_if_no_increase_hook",
    "stop_if_no_decrease_hook", "make_early_stopping_hook", "read_eval_metrics",
    "InMemoryEvaluatorHook",
    "train_and_evaluate", "TrainSpec", "EvalSpec", "Estimator", "export_saved_model",
]
# TF names with no class or function of the same name here (they map to Lightning, hook
# arguments or torch.export), or a name that is no object (request_stop is a method).
NOT_PORTED_BY_NAME = {"train_and_evaluate", "TrainSpec", "EvalSpec", "Estimator",
                      "export_saved_model", "request_stop"}

# Estimator's methods, each shown in TF1 code on the start-here page.
ESTIMATOR_STEPS = ["estimator.train(", "estimator.evaluate(", "estimator.predict(",
                   "train_and_evaluate(", "export_saved_model("]


def page_text(name: str) -> str:
    with open(os.path.join(GUIDE, name), encoding="utf-8") as f:
        return f.read()


def runnable_blocks(text: str) -> list:
    # exactly "```python" then a newline: "```python tf1" blocks are TF code, never run
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def tf1_blocks(text: str) -> list:
    return re.findall(r"^```python tf1\n(.*?)^```$", text, flags=re.S | re.M)


def all_tf1_code() -> list:
    return [block for name in PAGES for block in tf1_blocks(page_text(name))]


def all_runnable_code() -> list:
    return [block for name in PAGES for block in runnable_blocks(page_text(name))]


def test_the_old_single_page_guide_moved_to_the_appendix() -> None:
    docs = os.path.dirname(GUIDE)
    assert not os.path.exists(os.path.join(docs, "migrating_from_tf1.md"))
    assert sorted(name for name in os.listdir(GUIDE) if name.endswith(".md")) == sorted(PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_every_page_has_tf1_code_and_runnable_code(name: str) -> None:
    text = page_text(name)
    assert text.startswith("# "), f"{name}: no title"
    assert tf1_blocks(text), f"{name}: no ```python tf1 block"
    runnable = runnable_blocks(text)
    assert runnable, f"{name}: no runnable ```python block"
    for i, block in enumerate(runnable):  # no TensorFlow in what runs
        assert "tf.compat" not in block and "tf.estimator" not in block, f"{name} block {i}"
        assert "import tensorflow" not in block, f"{name} block {i}"


def test_start_here_ports_every_estimator_method() -> None:
    text = page_text("start-here.md")
    tf1 = "\n".join(tf1_blocks(text))
    for step in ESTIMATOR_STEPS:
        assert step in tf1, f"start-here.md: the TF1 program does not call {step}"
    runnable = "\n".join(runnable_blocks(text))
    assert len(runnable_blocks(text)) >= 5
    for port in ("HookCallback(", "MonitoredSession(", ".fit(", ".validate(", ".predict(",
                 "torch.export.export("):
        assert port in runnable, f"start-here.md: no runnable {port}"


def test_the_evaluation_pages_put_the_model_in_eval_mode() -> None:
    for name in ("start-here.md", "evaluate-and-predict.md"):
        runnable = "\n".join(runnable_blocks(page_text(name)))
        assert ".eval()" in runnable and "torch.no_grad()" in runnable, name


def test_an_early_stopping_hook_is_shown_as_a_training_hook() -> None:
    text = page_text("train-and-evaluate.md")
    assert "training_hooks=[early_stop]" in "\n".join(runnable_blocks(text))


@pytest.mark.parametrize("name", TF_NAMES)
def test_every_tf_name_is_shown_in_tf1_code_and_ported(name: str) -> None:
    pattern = re.compile(rf"\b{name}\b")
    assert any(pattern.search(block) for block in all_tf1_code()), (
        f"{name}: no ```python tf1 block of docs/migration shows it"
    )
    if name not in NOT_PORTED_BY_NAME:
        assert hasattr(lightning_finalops, name), f"{name}: lightning_finalops has no {name}"
        assert any(pattern.search(block) for block in all_runnable_code()), (
            f"{name}: no runnable block ports it"
        )


def test_links_between_pages_resolve() -> None:
    for name in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page_text(name)):
            if target.startswith("../"):  # a page of the package's documentation
                path = os.path.normpath(os.path.join(GUIDE, target))
                if not os.path.exists(path):  # written by another change: skip, not fail
                    continue
            else:
                path = os.path.join(GUIDE, target)
            assert os.path.exists(path), f"{name}: broken link {target}"
