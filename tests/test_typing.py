"""mypy sees the public API as users write it (the package ships ``py.typed``)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_user_script_type_checks_with_hook_callback_and_early_stopping_attributes():
    pytest.importorskip("mypy")
    script = pathlib.Path(__file__).with_name("typing_user_script.py")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", os.devnull, str(script)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
