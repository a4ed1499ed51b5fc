"""Ready recipes, one YAML file each, named by file stem.

``load_recipe`` accepts a recipe name (``gfl-tiny``) or a path to a YAML file of the user's own. It
checks the whole recipe before anything is built or written: the recipe keys (``distill.config``)
and the detector's parameters (``students.validate_student``: ``student.params`` keys, types,
ranges and relations, one line naming ``student.params.<key>``).
"""
from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path

from distill.config import Recipe, apply_overrides, override_source, read_yaml, recipe_from_dict
from distill.errors import ConfigError

# The dense recipe the README recommends: chosen on the tuning split of benchmarks/distill_gain.py
# (scenes, ImageNet-pretrained student; record benchmarks/records/distill_gain-scenes-pretrained.json).
# It is also what ``detkd cache`` without --recipe caches (the teacher's feature rows at every valid location).
RECOMMENDED = "pkd"


def _recipe_dir() -> Path:
    return Path(str(resources.files(__name__)))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        return path
    candidate = _recipe_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown recipe '{name_or_path}' (known: {', '.join(list_recipes())}; or pass a .yaml path)")
    return candidate


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name_or_path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        recipe = recipe_from_dict(raw, str(path))
        _validate_student(recipe, str(path))
        return recipe
    except ConfigError as exc:
        raise override_source(exc, list(overrides or []), str(path)) from None


def _validate_student(recipe: Recipe, source: str) -> None:
    from students import is_student, list_students, student_entrypoint, validate_student  # the detectors (torch, timm) load only here

    if not is_student(recipe.student.name):
        raise ConfigError(f"{source}: 'student.name' {recipe.student.name!r} is not a registered detector (known: {', '.join(list_students())})")
    if recipe.reference is not None and "grid" not in inspect.signature(student_entrypoint(recipe.student.name)).parameters:
        raise ConfigError(
            f"{source}: 'reference: {recipe.reference}' reproduces a dense GFL pair's reference code, but student "
            f"{recipe.student.name!r} has no location grid (no 'grid' parameter)"
        )
    validate_student(recipe.student.name, recipe.student.params, source)


__all__ = ["RECOMMENDED", "list_recipes", "load_recipe", "recipe_path"]
