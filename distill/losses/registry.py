"""The distillation-loss contract and its registry.

A distillation loss is ``(name, weight, region, params)``: ``create_loss("ld", weight=0.25,
region="vlr", region_params={"gamma": 0.25}, temperature=10.0)``. Every loss is a
:class:`DistillLoss` (an ``nn.Module``, so it may own trainable parameters such as a feature adapter)
with one call contract::

    value = loss(student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor  # () fp32

- ``student`` / ``teacher`` hold what a loss may read: the head outputs (:class:`DenseOutputs`),
  the FPN features, and for the student its :class:`Assignment` (positives, quality weights).
- ``mask``: (B, N) float location weights in DenseOutputs flatten order, produced by ``loss.region``
  (a :class:`distill.regions.Region`). Locations with weight 0 are not distilled.
- The returned value is already multiplied by ``loss.weight`` (like the student's own loss terms), is
  computed in fp32 with autocast disabled, reaches only the student (teacher tensors are detached),
  and is exactly 0 — with the graph still connected — when the mask selects nothing.
- ``loss.needs`` (class attribute) names the teacher parts the loss reads: ``"features"`` (backbone +
  FPN) and/or ``"head"`` (DenseOutputs). The engine runs only those parts of the frozen teacher.
- ``loss.legacy_sums_over_batch`` tells whether ``legacy=True`` reproduces a reference normalisation
  that grows with the number of images (LD's constant ``avg_factor``), documented and tested as such.

One training step, as the engine runs it::

    feats = student.features(images); out = student.head(feats)
    terms, assignment = student.loss(out, targets, image_sizes)
    needs = set().union(*(l.needs for l in losses))
    with torch.no_grad():                                  # frozen, eval-mode teacher
        t_feats = teacher.features(images)
        t_out = teacher.head(t_feats) if "head" in needs else None
    s_in = DistillInputs(outputs=out, features=feats, assignment=assignment)
    t_in = DistillInputs(outputs=t_out, features=t_feats if "features" in needs else None)
    for loss in losses:                                    # cache masks by loss.region (hashable)
        mask = loss.region(out.points, out.strides, targets, assignment)
        terms[f"loss_{loss.name}"] = loss(s_in, t_in, mask)

Losses read tensors only through :class:`DistillInputs`' row accessors (``cls_rows``, ``reg_rows``,
``feature_rows``), and their math lives in kernels over flattened ``(rows, K)`` tensors with row
weights and an explicit normaliser; a teacher served from a cache of gathered rows only needs another
provider of those accessors.

Registry (timm style): ``@register_loss`` on the class (keyed by its ``name``), ``create_loss``,
``list_losses``. Unknown names, parameters or bad values raise :class:`ConfigError` naming them.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.regions import Region, create_region
from distill.structures import Assignment, DenseOutputs

TEACHER_PARTS = frozenset({"features", "head"})


@dataclass
class DistillInputs:
    """What one side (student or teacher) offers to the distillation losses.

    outputs:    head outputs, needed by losses with ``"head"`` in ``needs``.
    features:   FPN maps, per level (B, C, H_l, W_l), needed by losses with ``"features"``.
    assignment: the student's label assignment (None for the teacher).
    """

    outputs: DenseOutputs | None = None
    features: list[Tensor] | None = None
    assignment: Assignment | None = None
    # The levels concatenated once per step and shared by every loss (one cat and one backward
    # through it instead of one per loss): "cls" -> (B, N, C), "reg" -> (B, N, 4, reg_max + 1).
    _flat: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def cls_rows(self, select: Tensor) -> Tensor:
        """select (B, N) bool -> (M, C) class logits of the selected locations, batch-major."""
        return self._flattened("cls", "class logits")[select]

    def reg_rows(self, select: Tensor) -> Tensor:
        """select (B, N) bool -> (M, 4, reg_max + 1) bin logits of the selected locations."""
        return self._flattened("reg", "box-bin logits")[select]

    def _flattened(self, part: str, what: str) -> Tensor:
        if part not in self._flat:
            outputs = self.require_outputs(what)
            self._flat[part] = outputs.flat_cls() if part == "cls" else outputs.flat_reg()
        return self._flat[part]

    def feature_rows(self, level: int, select: Tensor) -> Tensor:
        """select (B, H_l * W_l) bool -> (M, C_l) feature vectors of level ``level`` at the selection."""
        feature = self.require_features()[level]
        rows = feature.flatten(2).transpose(1, 2)  # (B, HW, C)
        if bool(select.all()):  # region "all": the same rows in the same order, without a gather/scatter
            return rows.reshape(-1, rows.shape[-1])
        return rows[select]  # (M, C)

    def feature_sizes(self) -> list[tuple[int, int]]:
        """(H_l, W_l) of every FPN level."""
        return [(f.shape[-2], f.shape[-1]) for f in self.require_features()]

    def require_outputs(self, what: str) -> DenseOutputs:
        """The head outputs, or a ValueError naming what the calling loss wanted from them."""
        if self.outputs is None:
            raise ValueError(f"this loss reads {what}, but DistillInputs.outputs is None (teacher head not run?)")
        return self.outputs

    def require_features(self) -> list[Tensor]:
        """The FPN maps, or a ValueError when this side was run without them."""
        if self.features is None:
            raise ValueError("this loss reads FPN features, but DistillInputs.features is None")
        return self.features


class DistillLoss(nn.Module):
    """Base class: holds the weight and region, validates the mask, runs :meth:`loss` in fp32."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    legacy_sums_over_batch: ClassVar[bool] = False

    def __init__(self, *, weight: float = 1.0, region: str = "main", region_params: Mapping[str, Any] | None = None):
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"loss {self.name!r}: weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.region: Region = create_region(region, **dict(region_params or {}))

    def forward(self, student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor:
        """mask: (B, N) float (bool accepted). Returns the weighted scalar loss in fp32."""
        # Softmax / KL / squared errors in half precision lose the small differences they measure.
        with torch.autocast(device_type=mask.device.type, enabled=False):
            return self.weight * self.loss(student, teacher, mask.detach().float())

    def loss(self, student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor:
        """The unweighted loss; subclasses implement it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}, region={self.region}"


def check_mask(mask: Tensor, num_images: int, num_locations: int, loss_name: str) -> None:
    """Raise when the region mask does not match the dense outputs, (B, N)."""
    if tuple(mask.shape) != (num_images, num_locations):
        raise ValueError(
            f"loss {loss_name!r}: mask has shape {tuple(mask.shape)}, expected ({num_images}, {num_locations})"
        )


def check_same_locations(student: DenseOutputs, teacher: DenseOutputs, loss_name: str) -> None:
    """Raise ConfigError when student and teacher do not predict at the same dense locations."""
    if student.level_sizes != teacher.level_sizes:
        raise ConfigError(
            f"loss {loss_name!r}: student levels {student.level_sizes} != teacher levels {teacher.level_sizes}; "
            "logit distillation needs the same strides and input size"
        )


_LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Class decorator: register a :class:`DistillLoss` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
        raise TypeError(f"register_loss expects a DistillLoss subclass, got {cls!r}")
    if cls.name in _LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice: {_LOSSES[cls.name].__qualname__} and {cls.__qualname__}")
    if not cls.needs or not cls.needs <= TEACHER_PARTS:
        raise ValueError(f"loss {cls.name!r}: needs must be a non-empty subset of {sorted(TEACHER_PARTS)}")
    _LOSSES[cls.name] = cls
    return cls


def list_losses(pattern: str = "*") -> list[str]:
    """Sorted registered loss names matching a shell-style ``pattern``."""
    return sorted(n for n in _LOSSES if fnmatch.fnmatch(n, pattern))


def loss_parameters(name: str) -> list[str]:
    """The keyword arguments ``create_loss(name, ...)`` accepts."""
    signature = inspect.signature(_get(name).__init__)
    return [p.name for p in signature.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def create_loss(name: str, **kwargs: Any) -> DistillLoss:
    """Build a registered loss; unknown names or parameters raise ConfigError naming them."""
    accepted = loss_parameters(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}"
        )
    return _get(name)(**kwargs)


def _get(name: str) -> type[DistillLoss]:
    if name not in _LOSSES:
        raise ConfigError(f"unknown distillation loss {name!r}; available: {', '.join(list_losses())}")
    return _LOSSES[name]
