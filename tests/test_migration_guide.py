"""docs/migrating_from_tf1.md: every runnable block runs, in order, and every TF name has a port.

Blocks fenced ```` ```python ```` run in one namespace, as a reader copies them; blocks fenced
```` ```python tf1 ```` are TensorFlow 1 code and are not run (TensorFlow is not installed).
"""

from __future__ import annotations

import logging
import os
import re

import pytest

GUIDE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "migrating_from_tf1.md"
)

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
    "train_and_evaluate", "TrainSpec", "EvalSpec",
]
# TF names with no class of the same name here (they map to Lightning / hook arguments).
NOT_PORTED_BY_NAME = {"train_and_evaluate", "TrainSpec", "EvalSpec"}

MIN_RUNNABLE_BLOCKS = 20

# Each numbered section from 2 on shows TF1 code, a plain-loop port and a Lightning port.
PLAIN = re.compile(r"\bMonitored(Training)?Session\(")
LIGHTNING = re.compile(r"\bHookCallback\(")


def guide_text() -> str:
    with open(GUIDE, encoding="utf-8") as f:
        return f.read()


def runnable_blocks(text: str) -> list:
    # exactly "```python" then a newline: "```python tf1" blocks are TF code, never run
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def tf1_blocks(text: str) -> list:
    return re.findall(r"^```python tf1\n(.*?)^```$", text, flags=re.S | re.M)


def sections(text: str) -> dict:
    """``{number: text}`` of the ``## <number>. <title>`` sections."""
    parts = re.split(r"^## (\d+)\. .*$", text, flags=re.M)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2])}


def test_the_guide_has_runnable_and_tf1_blocks() -> None:
    text = guide_text()
    assert len(runnable_blocks(text)) >= MIN_RUNNABLE_BLOCKS
    assert len(tf1_blocks(text)) >= 10
    # no runnable block holds TensorFlow code
    for i, block in enumerate(runnable_blocks(text)):
        assert "tf.compat" not in block and "tf.estimator" not in block, f"block {i}"


@pytest.mark.parametrize("name", TF_NAMES)
def test_every_tf_name_is_shown_in_tf1_code_and_ported(name: str) -> None:
    text = guide_text()
    assert any(re.search(rf"\b{name}\b", block) for block in tf1_blocks(text)), (
        f"{name}: no ```python tf1 block shows it"
    )
    if name not in NOT_PORTED_BY_NAME:
        assert any(re.search(rf"\b{name}\b", block) for block in runnable_blocks(text)), (
            f"{name}: no runnable block ports it"
        )


def test_every_section_shows_tf1_code_a_plain_port_and_a_lightning_port() -> None:
    found = sections(guide_text())
    assert sorted(found) == list(range(1, 15)), sorted(found)
    for number in range(2, 13):
        body = found[number]
        runnable = runnable_blocks(body)
        assert tf1_blocks(body), f"section {number}: no TF1 code"
        assert any(PLAIN.search(block) for block in runnable), f"section {number}: no plain port"
        assert any(LIGHTNING.search(block) for block in runnable), (
            f"section {number}: no Lightning port"
        )
        assert "| difference |" in body or "| TF1 |" in body, f"section {number}: no table"


@pytest.fixture
def _restore_library_logger():
    """The guide adds a handler to the "lightning_finalops" logger; take it off afterwards."""
    logger = logging.getLogger("lightning_finalops")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    from lightning_finalops.hooks import summary

    summary.SummaryWriterCache.clear()  # the writers the guide's hooks opened


def test_every_runnable_block_runs_in_order(tmp_path, monkeypatch, capsys,
                                            _restore_library_logger) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace = {"__name__": "__main__"}  # one reader, blocks copied one after the other
    for i, block in enumerate(runnable_blocks(guide_text())):
        try:
            exec(compile(block, f"docs/migrating_from_tf1.md python block {i}", "exec"),
                 namespace)
        except Exception as e:  # noqa: BLE001 - report which block failed
            pytest.fail(f"docs/migrating_from_tf1.md python block {i} failed: {e!r}\n{block}")
    out = capsys.readouterr().out
    assert "plain loop stopped at step" in out and "Lightning stopped at step" in out
    assert "stop_if_no_decrease_hook: stopped at step 36" in out
