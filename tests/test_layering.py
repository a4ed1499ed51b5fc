"""Layering: the engine sits on top; teachers, losses, pairers and the base modules never reach up.

``distill/engine`` (training loop, Distiller, runs) imports ``teachers``; so ``teachers`` must not
import ``distill.engine`` (a cycle) nor a particular student family (``students.gfl``): it talks to
detectors through the contract (``distill.detector``). The base modules (checkpoint, report,
structures, inputs, pairers, losses, regions, ops) import neither the engine nor the CLI.

Detector families (``students.gfl`` dense, ``students.sparse`` query detectors) never import each other;
what both use lives in ``students.common``. Inside the sparse family each model subpackage
(``asag``, ``sparse_rcnn``, ``dab_detr``) imports only the family's shared modules, never another model.
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
    "distill/checkpoint.py": ("distill.engine", "distill.cli", "teachers"),
    "distill/report.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/structures.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/inputs.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "distill/regions.py": ("distill.engine", "distill.cli", "teachers", "students"),
    "students/gfl": ("students.sparse", "distill.engine", "distill.cli", "teachers"),
    "students/sparse": ("students.gfl", "distill.engine", "distill.cli", "teachers"),
    "students/common": ("students.gfl", "students.sparse", "distill.engine", "distill.cli", "teachers"),
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
