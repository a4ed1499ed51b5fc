"""Layering: the engine sits on top; teachers, losses, pairers and the base modules never reach up.

``distill/engine`` (training loop, Distiller, runs) imports ``teachers``; so ``teachers`` must not
import ``distill.engine`` (a cycle) nor a particular student family (``students.gfl``): it talks to
detectors through the contract (``distill.detector``). The base modules (checkpoint, report,
structures, inputs, pairers, losses, regions, ops) import neither the engine nor the CLI, and
``distill.checkpoint`` (the file format) builds no detector: ``students.saved.load_detector`` does.

Detector families (every subpackage of ``students`` but ``common``: ``gfl`` dense, ``sparse`` query
detectors) never import each other, nor the ``students`` package (whose ``__init__`` imports every
family); what several use lives in ``students.common`` or the family-free modules ``students.registry``
and ``students.backbone``, which import no family. Inside the sparse family each model subpackage
(``asag``, ``sparse_rcnn``, ``dab_detr``) imports only the family's shared modules, never another model.

``distill.data`` (datasets, transforms, loaders, generators) sits under everything that trains: it
imports neither the engine, the CLI, a detector nor a teacher.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    "teachers": ("distill.engine", "distill.cli", "students.gfl"),
    "distill/losses": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/pairers": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/ops": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/checkpoint.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/report.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/structures.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/inputs.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/regions.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "students/gfl": ("students.sparse", "distill.engine", "distill.cli", "teachers"),
    "students/sparse": ("students.gfl", "distill.engine", "distill.cli", "teachers"),
    "students/common": ("students.gfl", "students.sparse", "distill.engine", "distill.cli", "teachers"),
    "students/registry.py": ("students.gfl", "students.sparse", "distill.engine", "distill.cli", "teachers"),
    "students/backbone.py": ("students.gfl", "students.sparse", "distill.engine", "distill.cli", "teachers"),
    "students/saved.py": ("students.gfl", "students.sparse", "distill.engine", "distill.cli", "teachers"),
    "distill/data": ("distill.engine", "distill.cli", "students", "teachers"),
    "students/sparse/asag": ("students.sparse.sparse_rcnn", "students.sparse.dab_detr"),
    "students/sparse/sparse_rcnn": ("students.sparse.asag", "students.sparse.dab_detr"),
    "students/sparse/dab_detr": ("students.sparse.asag", "students.sparse.sparse_rcnn"),
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("where", sorted(RULES))
def test_no_upward_imports(where):
    target = ROOT / where
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    assert files, where
    bad = [
        f"{f.relative_to(ROOT)} imports {module}"
        for f in files
        for module in sorted(imports(f))
        if any(module == banned or module.startswith(banned + ".") for banned in RULES[where])
    ]
    assert bad == []


FAMILIES = sorted(p.name for p in (ROOT / "students").iterdir() if (p / "__init__.py").is_file() and p.name != "common")


def test_the_families_are_found():
    assert {"gfl", "sparse"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_no_other_family(family):
    banned = tuple(f"students.{other}" for other in FAMILIES if other != family)
    bad = [
        f"{f.relative_to(ROOT)} imports {module}"
        for f in sorted((ROOT / "students" / family).rglob("*.py"))
        for module in sorted(imports(f))
        # the bare package runs students/__init__.py, which imports every family
        if module == "students" or any(module == b or module.startswith(b + ".") for b in banned)
    ]
    assert bad == []


def test_imports_are_absolute():
    """The rules above read module names; a relative import (``from . import x``) would slip past them."""
    relative = [
        f"{f.relative_to(ROOT)}:{node.lineno}"
        for top in ("distill", "students", "teachers")
        for f in sorted((ROOT / top).rglob("*.py"))
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []
