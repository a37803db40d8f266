"""The wheel and the sdist build, pass ``twine check``, and carry what a package index shows."""

from __future__ import annotations

import email
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytest.importorskip("build")
pytest.importorskip("twine")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dist")
    # the sdist, then the wheel from it (as an index's users get them), with the installed
    # setuptools: no download
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_wheel_and_the_sdist_pass_twine_check(dist) -> None:
    files = sorted(str(p) for p in dist.iterdir())
    assert sorted(pathlib.Path(f).suffix for f in files) == [".gz", ".whl"]
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_wheel_carries_the_metadata_an_index_shows_and_only_the_package(dist) -> None:
    wheel = zipfile.ZipFile(next(dist.glob("*.whl")))
    names = wheel.namelist()
    assert "lightning_finalops/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    assert metadata["Requires-Python"] == ">=3.9"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "Apache" in (metadata["License"] or metadata["License-Expression"] or "")
    assert len(metadata.get_all("Classifier")) >= 10
    assert not [c for c in metadata.get_all("Classifier") if c.startswith("License ::")]
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("tensorboard") for r in requires)  # the base install's defaults
    examples = [r for r in requires if 'extra == "examples"' in r]
    assert any(r.startswith("lightning") for r in examples)  # what the README blocks import
    assert metadata.get_payload().startswith("# lightning_finalops")  # the README
