"""The documentation site: every page's code runs, the API page covers ``__all__``, it builds.

Within one page the ```python blocks run in order in one fresh process (a page is what a
reader copies). Blocks fenced ```python tf1 (TensorFlow, not installed) or ```python norun
(several processes; the page names the test that runs it) are not run.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import lightning_finalops

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)


def python_blocks(page: pathlib.Path) -> list:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def _env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_the_python_blocks_of_a_page_run_in_one_process(page, tmp_path):
    code = "\n\n".join(python_blocks(page))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"docs/{page.relative_to(DOCS)}: its python blocks failed (exit {proc.returncode})\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


def test_the_api_page_renders_every_public_name():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    directives = set(re.findall(r"^::: lightning_finalops\.(\w+)\s*$", text, flags=re.M))
    missing = sorted(set(lightning_finalops.__all__) - directives)
    assert not missing, f"docs/api.md has no '::: lightning_finalops.<name>' for {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs and mkdocstrings are not installed (pip install '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
