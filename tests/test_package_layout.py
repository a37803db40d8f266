"""The package's shape: what each module exports, and that its layers import downwards only."""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import Dict, List, Set, Tuple

import lightning_finalops

PACKAGE = pathlib.Path(lightning_finalops.__file__).parent

# The layer table of docs/concepts.md, lowest first: a module imports only from its layer and below.
LAYERS: List[Tuple[str, ...]] = [
    ("session_run_hook", "validation", "sync_audit"),
    ("fetches", "checkpoints", "distributed"),
    ("engine", "hook_state", "run", "raw_session", "hooked_session", "evaluation_loop"),
    ("hooks",),
    ("monitored_session", "lightning"),
    ("training_session",),
    ("__init__",),
]


def _modules() -> Dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name] = ast.parse(path.read_text())
    return found


def _imports(tree: ast.Module) -> List[Tuple[str, List[str]]]:
    """``(module, names)`` of every ``from lightning_finalops.X import names`` in ``tree``."""
    return [
        (node.module[len("lightning_finalops."):], [a.name for a in node.names])
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        and node.module.startswith("lightning_finalops.")
    ]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer or module in layer:
            return i
    raise AssertionError(f"{module} is in no layer of the table in docs/concepts.md")


def test_every_name_a_module_takes_from_another_is_in_that_modules_all():
    modules = _modules()
    missing: Set[str] = set()
    for importer, tree in modules.items():
        for source, names in _imports(tree):
            if source not in modules:
                continue  # a subpackage imported as a module
            exported = importlib.import_module(f"lightning_finalops.{source}").__all__
            missing.update(f"{source}.{n} (in {importer})" for n in names if n not in exported)
    assert not missing


def test_no_module_takes_a_private_name_from_another():
    private = [
        f"{importer}: {source}.{name}"
        for importer, tree in _modules().items()
        for source, names in _imports(tree)
        for name in names if name.startswith("_")
    ]
    assert not private


def test_no_module_imports_from_the_package_itself():
    """``from lightning_finalops import x`` inside the package goes through ``__init__``,
    which imports every layer: a loop, whatever ``x`` is."""
    through_package = [
        name for name, tree in _modules().items() if name != "__init__"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "lightning_finalops"
    ]
    assert not through_package


def test_every_import_points_down_the_layers_and_none_forms_a_cycle():
    upward = [
        f"{importer} -> {source}"
        for importer, tree in _modules().items()
        for source, _ in _imports(tree)
        if _layer(source) > _layer(importer)
    ]
    assert not upward


def test_each_module_says_its_one_job_in_its_first_docstring_line():
    for name, tree in _modules().items():
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].strip(), f"{name} has no docstring"


def test_every_public_name_is_documented_and_importable():
    for name in lightning_finalops.__all__:
        obj = getattr(lightning_finalops, name)
        if callable(obj):
            assert obj.__doc__, name
