"""Ready recipes, one YAML file each, named by file stem.

``load_recipe`` accepts a recipe name (``gfl-tiny``) or a path to a YAML file of the user's own.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from distill.config import Recipe, apply_overrides, override_source, read_yaml, recipe_from_dict
from distill.errors import ConfigError


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
        return recipe_from_dict(raw, str(path))
    except ConfigError as exc:
        raise override_source(exc, list(overrides or []), str(path)) from None


__all__ = ["list_recipes", "load_recipe", "recipe_path"]
