"""The README is a front page: two fresh-machine commands first, then examples that run.

Each ```python block runs on its own in a fresh process, as a reader who copies one block
runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```$", readme(), flags=re.S | re.M)


def test_the_readme_is_a_front_page():
    assert os.path.getsize(README) <= 12 * 1024
    assert len(python_blocks()) >= 3


def test_the_first_block_is_the_two_fresh_machine_commands():
    first = re.search(r"^```(\w*)\n(.*?)^```$", readme(), flags=re.S | re.M)
    assert first is not None and first.group(1) == "bash"
    lines = first.group(2).splitlines()
    assert "# the tests" in lines  # .ci/run runs the line after it, verbatim
    test_cmd = lines[lines.index("# the tests") + 1]
    assert "python -m pytest" in test_cmd
    assert any("python examples/train_lightning.py" in line for line in lines)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_each_python_block_runs_on_its_own(index, tmp_path):
    block = python_blocks()[index]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"README python block {index} failed:\n{block}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"README python block {index} printed nothing"
