"""Recipes: typed dataclasses loaded from YAML, validated with errors that name the key.

A recipe says what to build and how to train it; nothing is looked up by a ``type=`` string except
the student (``students.create_student``) and the losses (``distill.create_loss``), whose names and
keyword arguments are checked against their registries when the run is built.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.errors import ConfigError


@dataclass
class ModelSpec:
    """A registered detector and the keyword arguments of its factory."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    image_size: int = 160
    hflip_prob: float = 0.5
    size_divisor: int = 32
    invalid_boxes: Literal["error", "clip"] = "error"


@dataclass
class TrainSpec:
    epochs: int = 12
    batch_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_steps: int = 100
    warmup_ratio: float = 0.001
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)  # epochs at which "step" multiplies lr by gamma
    gamma: float = 0.1
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    grad_clip: float | None = 35.0
    eval_every: int = 1
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers; None = auto (distill.engine.device.auto_workers)
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default


@dataclass
class EvalSpec:
    batch_size: int = 16
    score_thresh: float = 0.05
    nms_iou: float = 0.6
    max_detections: int = 100


@dataclass
class LossSpec:
    """One distillation term: ``weight * loss(student, teacher, pairs)``, pairs from ``pairer``
    (a dense region: main, vlr, gt_boxes, all; or a matched pairer: gt_bridged, teacher_set)."""

    name: str
    weight: float = 1.0
    pairer: str = "main"
    params: dict[str, Any] = field(default_factory=dict)
    pairer_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSpec:
    """Which recipe trains the teacher, and the pair checks to run before distilling."""

    recipe: str | None = None
    min_ap: float = 0.05  # refuse to distill from a teacher below this val AP (unless --force)
    class_map: dict[str, str] = field(default_factory=dict)  # student class name -> teacher class name


@dataclass
class Recipe:
    name: str
    kind: Literal["teacher", "student", "distill"]
    purpose: str
    student: ModelSpec
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    teacher: TeacherSpec | None = None
    losses: list[LossSpec] = field(default_factory=list)
    # "ld": reproduce the official LD code (see ``expand_reference``); None: detkd's own conventions.
    reference: Literal["ld"] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Validation: a small, strict dataclass-from-dict builder. Errors name the dotted key.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, source, prefix=key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r}")


def build_dataclass(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types by dotted key."""
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{source}: unknown key '{full}' (known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], full, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{full}'")
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+|[-+]?(nan|inf|\.nan|\.inf)", re.IGNORECASE)


def override_source(error: ConfigError, pairs: list[str], source: str) -> ConfigError:
    """An error about a key set by ``--set`` names the override, not the recipe file."""
    message = str(error)
    match = re.match(re.escape(source) + r": .*?'([^']+)'", message)
    if match is None:
        return error
    key = re.sub(r"\[(\d+)\]", r".\1", match.group(1))
    for pair in reversed(pairs):
        set_key = pair.split("=", 1)[0].strip()
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return ConfigError(f"--set {pair}: " + message[len(source) + 2:])
    return error


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``--set a.b=value`` pairs; values are YAML (``0.01``, ``[1, 2]``, ``null``, ``sgd``)."""
    parsed = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.lr=0.01")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: value is not valid YAML ({exc.problem})") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot, no exponent sign) as a string
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe mapping (before validation).

    List items are addressed by index: ``losses.0.weight=0.5``.
    """
    for path, value in parse_overrides(pairs):
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            dotted = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {'.'.join(path)}: '{dotted}' is not an index of a {len(node)}-item list")
                node = node[int(part)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: '{dotted}' is not a mapping")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {'.'.join(path)}: '{last}' is not an index of a {len(node)}-item list")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def recipe_from_dict(raw: dict[str, Any], source: str) -> Recipe:
    return expand_reference(check_ranges(build_dataclass(Recipe, raw, source), source), source)


# --------------------------------------------------------------------------------------------
# Reference mode: one switch for everything a paper's code does differently from detkd.

# The official LD code (HikariTJU/LD, mmdetection 2.x), ld-gfl-spec: its KD, LD and feature
# imitation normalisers (``legacy``), its VLR "DIoU" (intersection over the anchor's area), and
# mmdetection's location grid (cell corners, valid flags of the 32-padded image).
REFERENCE_LEGACY_LOSSES = ("kd", "ld", "feature")
REFERENCE_VLR_METRIC = "diou_iof_legacy"
REFERENCE_GRID = "mmdet"


def expand_reference(recipe: Recipe, source: str) -> Recipe:
    """Apply ``reference: ld`` to the recipe's parts, in place; idempotent (a saved run's recipe,
    already expanded, loads to the same). Sets ``student.params.grid: mmdet``, ``legacy: true`` on
    every ``kd`` / ``ld`` / ``feature`` loss and ``metric: diou_iof_legacy`` on every ``vlr`` pairer.
    A value the recipe sets otherwise is a contradiction, refused with the key; losses the reference
    has no counterpart for (CrossKD, PKD, ...) are left as they are. The teacher must predict on the
    same grid (train it with ``reference: ld`` too): dense pairs refuse two grids.
    """
    if recipe.reference != "ld":
        return recipe
    wanted = [("student.params.grid", recipe.student.params, "grid", REFERENCE_GRID)]
    for i, spec in enumerate(recipe.losses):
        if spec.name in REFERENCE_LEGACY_LOSSES:
            wanted.append((f"losses[{i}].params.legacy", spec.params, "legacy", True))
        if spec.pairer == "vlr":
            wanted.append((f"losses[{i}].pairer_params.metric", spec.pairer_params, "metric", REFERENCE_VLR_METRIC))
    for key, where, name, value in wanted:
        if name in where and where[name] != value:
            raise ConfigError(f"{source}: '{key}' is {where[name]!r}, but 'reference: ld' sets it to {value!r} (remove one of the two)")
        where[name] = value
    return recipe


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    return raw


# --------------------------------------------------------------------------------------------
# Ranges: a well-typed recipe can still be meaningless (batch size 0, a NaN lr). One line each.


def _ranges(recipe: Recipe) -> list[tuple[str, Any, bool, str]]:
    """(dotted key, value, ok, requirement) for every numeric setting."""
    t, d, e = recipe.train, recipe.data, recipe.eval

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    checks = [
        ("train.epochs", t.epochs, t.epochs >= 1, ">= 1"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
        ("train.lr", t.lr, finite(t.lr) and t.lr > 0, "a finite number > 0"),
        ("train.weight_decay", t.weight_decay, finite(t.weight_decay) and t.weight_decay >= 0, "a finite number >= 0"),
        ("train.momentum", t.momentum, finite(t.momentum) and 0 <= t.momentum < 1, "in [0, 1)"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.warmup_ratio", t.warmup_ratio, finite(t.warmup_ratio) and 0 <= t.warmup_ratio <= 1, "in [0, 1]"),
        ("train.gamma", t.gamma, finite(t.gamma) and t.gamma > 0, "a finite number > 0"),
        ("train.min_lr_ratio", t.min_lr_ratio, finite(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.grad_clip", t.grad_clip, t.grad_clip is None or (finite(t.grad_clip) and t.grad_clip > 0), "null or a finite number > 0"),
        ("train.eval_every", t.eval_every, t.eval_every >= 1, ">= 1"),
        ("train.num_workers", t.num_workers, t.num_workers is None or t.num_workers >= 0, "null (auto) or >= 0"),
        ("train.threads", t.threads, t.threads is None or t.threads >= 1, "null or >= 1"),
        ("data.image_size", d.image_size, d.image_size >= 1, ">= 1"),
        ("data.size_divisor", d.size_divisor, d.size_divisor >= 1, ">= 1"),
        ("data.hflip_prob", d.hflip_prob, finite(d.hflip_prob) and 0 <= d.hflip_prob <= 1, "in [0, 1]"),
        ("eval.batch_size", e.batch_size, e.batch_size >= 1, ">= 1"),
        ("eval.score_thresh", e.score_thresh, finite(e.score_thresh) and 0 <= e.score_thresh <= 1, "in [0, 1]"),
        ("eval.nms_iou", e.nms_iou, finite(e.nms_iou) and 0 < e.nms_iou <= 1, "in (0, 1]"),
        ("eval.max_detections", e.max_detections, e.max_detections >= 1, ">= 1"),
    ]
    checks += [(f"train.milestones[{i}]", m, m >= 1, ">= 1") for i, m in enumerate(t.milestones)]
    checks += [(f"losses[{i}].weight", spec.weight, finite(spec.weight) and spec.weight >= 0, "a finite number >= 0") for i, spec in enumerate(recipe.losses)]
    if recipe.teacher is not None:
        checks.append(("teacher.min_ap", recipe.teacher.min_ap, finite(recipe.teacher.min_ap) and 0 <= recipe.teacher.min_ap <= 1, "in [0, 1]"))
    return checks


def check_ranges(recipe: Recipe, source: str) -> Recipe:
    for key, value, ok, requirement in _ranges(recipe):
        if not ok:
            raise ConfigError(f"{source}: '{key}' must be {requirement}, got {value!r}")
    return recipe
