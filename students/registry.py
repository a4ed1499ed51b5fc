"""Student registry: named factory functions, timm style.

A factory is a plain function whose keyword arguments are the model's hyper-parameters::

    @register_student
    def gfl_resnet18(num_classes: int = 80, **kw) -> GFL: ...

``create_student(name, **kwargs)`` validates the keyword names against the factory's signature,
builds the model and stamps ``model.config = {"name": name, "params": {...}}`` with every argument
(defaults included) so that a checkpoint can rebuild exactly the same architecture with
``create_student(config["name"], **config["params"])``.
"""
from __future__ import annotations

import fnmatch
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import PurePath
from typing import Any, TypeVar

from torch import nn

from distill.errors import ConfigError

__all__ = ["register_student", "create_student", "list_students", "is_student", "student_entrypoint"]

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])

_STUDENTS: dict[str, Callable[..., nn.Module]] = {}


def register_student(fn: FactoryT) -> FactoryT:
    """Register ``fn`` under its ``__name__``.

    Factories must name every parameter (no ``*args`` / ``**kwargs``) so that ``create_student`` can
    reject misspelt keys; a duplicate name or a variadic signature is a programming error.
    """
    name = fn.__name__
    if name in _STUDENTS and _STUDENTS[name] is not fn:
        raise ValueError(f"student {name!r} is already registered by {_STUDENTS[name].__module__}")
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        raise ValueError(f"student factory {name!r} must not take *args or **kwargs")
    _STUDENTS[name] = fn
    return fn


def list_students(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "") -> list[str]:
    """Sorted registered names matching any ``fnmatch`` wildcard in ``filter`` (all when empty)."""
    include = [filter] if isinstance(filter, str) else list(filter)
    exclude = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = set(_STUDENTS)
    if any(include):
        names = {n for n in names if any(fnmatch.fnmatchcase(n, f) for f in include if f)}
    names = {n for n in names if not any(fnmatch.fnmatchcase(n, f) for f in exclude if f)}
    return sorted(names)


def is_student(name: str) -> bool:
    return name in _STUDENTS


def student_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name``; ``ConfigError`` listing the known names otherwise."""
    if name not in _STUDENTS:
        raise ConfigError(f"unknown student {name!r}; known students: {', '.join(list_students())}")
    return _STUDENTS[name]


def create_student(name: str, **kwargs: Any) -> nn.Module:
    """Build the student registered as ``name`` with keyword overrides of its defaults.

    Raises ``ConfigError`` for an unknown name, an unknown keyword, a missing required keyword, or
    parameters that cannot be stored as JSON in a checkpoint.
    """
    fn = student_entrypoint(name)
    signature = inspect.signature(fn)
    for key in kwargs:
        if key not in signature.parameters:
            known = ", ".join(signature.parameters)
            raise ConfigError(f"student {name!r} has no parameter {key!r}; parameters: {known}")
    try:
        bound = signature.bind(**kwargs)
    except TypeError as exc:  # a required parameter is missing
        raise ConfigError(f"student {name!r}: {exc}") from exc
    bound.apply_defaults()
    params = dict(bound.arguments)
    model = fn(**params)
    # A model may resolve "auto" arguments (e.g. norm_eval=None); store the resolved value so that a
    # rebuild without the original pretrained file behaves identically.
    params.update(getattr(model, "resolved_params", {}))
    model.config = {"name": name, "params": _to_json(params, name)}
    return model


def _to_json(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Paths become strings and tuples lists; anything else JSON cannot hold is a ``ConfigError``."""

    def convert(value: Any) -> Any:
        if isinstance(value, PurePath):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    out = {k: convert(v) for k, v in params.items()}
    for key, value in out.items():
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ConfigError(
                f"student {name!r}: parameter {key!r} = {value!r} is not JSON-serialisable, so a checkpoint "
                "could not rebuild the model"
            ) from exc
    return out
