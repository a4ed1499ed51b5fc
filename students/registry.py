"""Student registry: named factory functions, timm style.

A factory is a plain function whose keyword arguments are the model's hyper-parameters::

    @register_student
    def gfl_resnet18(num_classes: int = 80, **kw) -> GFL: ...

Families with presets register them with :func:`register_preset` (one builder, many names, each
with its own defaults). A builder may carry ``check_params(params) -> list[ParamCheck]``: range and
relation checks on the full parameter set, which :func:`validate_student` runs together with type
checks from the signature's annotations, so a recipe is refused at load time, before anything is
built, with one line naming ``student.params.<key>``.

``create_student(name, **kwargs)`` validates the keyword names, types and ranges, builds the model
and stamps ``model.config = {"name": name, "params": {...}}`` with every argument
(defaults included) so that a checkpoint can rebuild exactly the same architecture with
``create_student(config["name"], **config["params"])``.
"""
from __future__ import annotations

import fnmatch
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, TypeVar

from torch import nn

from distill.errors import ConfigError

__all__ = [
    "register_student", "register_preset", "create_student", "list_students", "is_student", "student_entrypoint",
    "validate_student", "ParamCheck", "raise_failed", "finite",
]

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
    _check(fn, params, f"student {name!r}", "")
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


# --------------------------------------------------------------------------------- presets
def register_preset(name: str, build: Callable[..., nn.Module], doc: str, **defaults: Any) -> Callable[..., nn.Module]:
    """Register ``name`` as a factory with ``build``'s keyword parameters, ``defaults`` replacing its own.

    ``build`` is a plain function (or class) whose keyword arguments are the detector's flat
    hyper-parameters; its ``check_params`` (if any) becomes the preset's, so every name of a family
    is validated alike. The factory's signature is what ``create_student`` checks keys against and
    what a checkpoint's ``config["params"]`` is rebuilt from.
    """
    base = inspect.signature(build, eval_str=True)
    params = list(base.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    unknown = set(defaults) - {p.name for p in params}
    if unknown:
        raise ValueError(f"preset {name!r}: {build.__name__} has no parameter(s) {sorted(unknown)}")
    params = [p.replace(default=defaults.get(p.name, p.default)) for p in params]
    signature = base.replace(parameters=params, return_annotation=base.return_annotation)

    def factory(**kwargs: Any) -> nn.Module:
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        return build(**bound.arguments)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = build.__module__
    factory.__signature__ = signature  # what inspect (and create_student's key check) sees
    factory.check_params = getattr(build, "check_params", None)
    return register_student(factory)


# ------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class ParamCheck:
    """One range / relation check of a detector parameter: ``ok`` False means ``key`` must be ``requirement``."""

    key: str
    value: Any
    ok: bool
    requirement: str


def validate_student(name: str, params: dict[str, Any], source: str, prefix: str = "student.params.") -> None:
    """Check a recipe's ``student.params`` for the registered ``name`` without building anything.

    Unknown keys, values of the wrong type (from the factory's annotations) and values out of range
    or inconsistent with each other (the builder's ``check_params``) raise ``ConfigError`` with one
    line: ``{source}: '{prefix}{key}' must be ..., got ...``.
    """
    fn = student_entrypoint(name)
    signature = inspect.signature(fn)
    for key in params:
        if key not in signature.parameters:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (student {name!r} takes: {', '.join(signature.parameters)})")
    merged = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    merged.update(params)
    _check(fn, merged, source, prefix, given=set(params))


def _check(fn: Callable[..., nn.Module], params: dict[str, Any], source: str, prefix: str, given: set[str] | None = None) -> None:
    signature = inspect.signature(fn)
    for key, value in params.items():
        parameter = signature.parameters.get(key)
        if parameter is None or parameter.annotation is inspect.Parameter.empty or (given is not None and key not in given):
            continue
        annotation = parameter.annotation
        if isinstance(annotation, str):  # an unevaluated annotation: nothing reliable to check against
            continue
        if not _is_instance(value, annotation):
            raise ConfigError(f"{source}: '{prefix}{key}' must be {_describe(annotation)}, got {_show(value)}")
    check = getattr(fn, "check_params", None)
    if check is not None:
        raise_failed(check(params), source, prefix)


def raise_failed(rows: Iterable[ParamCheck], source: str, prefix: str = "") -> None:
    """``ConfigError`` for the first failed check: ``{source}: '{prefix}{key}' must be {requirement}, got {value}``."""
    for item in rows:
        if not item.ok:
            raise ConfigError(f"{source}: '{prefix}{item.key}' must be {item.requirement}, got {_show(item.value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if isinstance(value, str) else repr(value)


def _is_instance(value: Any, tp: Any) -> bool:
    """Does a YAML / JSON value fit the annotation ``tp`` (lists stand for tuples, str for paths)?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        item = args[0]
        return all(_is_instance(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return isinstance(value, (str, PurePath))
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}" if args else "a list"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    return {int: "an integer", bool: "true or false", str: "a string", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
