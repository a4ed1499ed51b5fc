"""The distillation-loss contract and its registry.

A distillation loss is ``(name, weight, pairer, params)``: ``create_loss("ld", weight=0.25,
pairer="vlr", pairer_params={"gamma": 0.25}, temperature=10.0)``. Every loss is a
:class:`DistillLoss` (an ``nn.Module``, so it may own trainable parameters such as a feature adapter)
with one call contract::

    loss.check_pair(student_spec, teacher_spec)   # before training: ConfigError when the pair does not fit
    value = loss(student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor  # () fp32

- ``student`` / ``teacher`` (:class:`~distill.inputs.DistillInputs`) hold what a loss may read:
  predictions, FPN features, matches; rows are read with each side's own index of ``pairs``.
- ``pairs`` (:class:`~distill.structures.Pairs`) come from ``loss.pairer`` (``distill.pairers``) in
  ``loss.space``: ``"predictions"`` for losses that read the head, ``"features"`` for FPN losses.
- The returned value is already multiplied by ``loss.weight`` (like the student's own loss terms), is
  computed in fp32 with autocast disabled, reaches only the student (teacher tensors are detached),
  and is exactly 0 — with the graph still connected — when there are no pairs.
- ``loss.needs`` (class attribute) names the teacher parts the loss reads: ``"features"`` (backbone +
  FPN), ``"head"`` (predictions), ``"head_tail"`` (its head finished on the student's maps, CrossKD),
  ``"decode"`` / ``"decoder_tail"`` (its decoder from given boxes / its last layer on the student's
  query state, CrossKD for queries). The engine runs only those parts of the frozen teacher (plus
  what the pairer needs, ``pairer.teacher_needs``).
- ``loss.heads``: ``"final"`` (default) distils the student's final predictions; ``"all"`` also
  each auxiliary head / earlier decoder stage (``Predictions.aux``) against the same teacher
  predictions, each head paired with its own matches; the term is the mean over heads.
- ``loss.check_pair`` is part of the contract: the pairer's check (families, strides), then the
  loss's own (classes, bins, channels). The engine calls it for every loss before any batch runs.
- ``loss.whole_maps`` names the teacher parts the loss reads at every valid location whatever its
  pairer selects (``pkd`` standardises whole FPN maps): a teacher cache serves it from region ``all``.
- ``loss.legacy_sums_over_batch`` tells whether ``legacy=True`` reproduces a reference normalisation
  that grows with the number of images (LD's constant ``avg_factor``), documented and tested as such.

One training step, as the engine runs it (``distill.engine.distiller.distillation_terms``)::

    feats = student.features(images); preds = student.head(feats, image_sizes)
    terms, matches = student.loss(preds, targets, image_sizes)
    s_in = DistillInputs(student.spec, preds, feats, matches, image_sizes)
    t_in = teacher_source.inputs(batch, s_in, needs)       # frozen teacher or teacher cache
    for loss in losses:                                     # pairs cached per (pairer, space)
        pairs = loss.pairer(s_in, t_in, targets, loss.space)
        terms[f"loss_{loss.name}_{loss.pairer}"] = loss(s_in, t_in, pairs)

The math lives in kernels over flattened ``(rows, K)`` tensors with row weights and an explicit
normaliser (``distill.losses.kl``).

Registry (timm style): ``@register_loss`` on the class (keyed by its ``name``), ``create_loss``,
``list_losses``. Unknown names, parameters or bad values raise :class:`ConfigError` naming them.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.pairers import Pairer, create_pairer
from distill.structures import DetectorSpec, Pairs

# "head_tail": the teacher head finished on the student's intermediate maps (CrossKD; DistillInputs.head_tail);
# "decode" / "decoder_tail": the teacher's decoder on given boxes / its last layer on a given query state
# (CrossKD for query detectors; DistillInputs.decode, .decoder_tail)
TEACHER_PARTS = frozenset({"features", "head", "head_tail", "decode", "decoder_tail"})
# "final": the student's final predictions only; "all": also every auxiliary head / earlier stage
# (``Predictions.aux``, each with its own ``Matches.aux``), the term being the mean over heads.
HEADS = ("final", "all")

__all__ = ["DistillInputs", "DistillLoss", "register_loss", "create_loss", "list_losses", "loss_parameters", "TEACHER_PARTS"]


class DistillLoss(nn.Module, ABC):
    """Base class: holds the weight and pairer, runs :meth:`loss` in fp32."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    legacy_sums_over_batch: ClassVar[bool] = False
    # Whether a teacher cache (region rows) can serve this loss; False names why it cannot.
    cache_refusal: ClassVar[str | None] = None
    # Teacher parts this loss reads at every valid location whatever its pairer selects (pkd's per-map
    # statistics): a teacher cache must hold them at region ``all`` (``teachers.cache_select.cached_region``).
    whole_maps: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, weight: float = 1.0, pairer: str = "main", pairer_params: Mapping[str, Any] | None = None, heads: str = "final"):
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"loss {self.name!r}: weight must be a finite number >= 0, got {weight!r}")
        if heads not in HEADS:
            raise ConfigError(f"loss {self.name!r}: heads must be one of {', '.join(HEADS)}, got {heads!r}")
        if heads == "all" and "features" in self.needs:
            raise ConfigError(f"loss {self.name!r} reads FPN features, which auxiliary heads share; heads: all is for prediction losses")
        self.weight = float(weight)
        self.heads = heads
        self.pairer: Pairer = create_pairer(pairer, **dict(pairer_params or {}))
        if self.pairer.only_for not in (None, self.name):
            raise ConfigError(f"loss {self.name!r}: pairer {self.pairer.name!r} pairs rows only loss {self.pairer.only_for!r} reads")

    @property
    def space(self) -> str:
        """What the pairs index: FPN locations for feature losses, predictions otherwise."""
        return "features" if "features" in self.needs else "predictions"

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        """Raise ConfigError when this loss cannot compare these two detectors (subclasses add checks)."""
        try:
            self.pairer.check(student, teacher, self.space)
        except ConfigError as exc:
            raise ConfigError(f"loss {self.name!r}: {exc}") from None

    def forward(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        """Returns the weighted scalar loss in fp32."""
        # Softmax / KL / squared errors in half precision lose the small differences they measure.
        with torch.autocast(device_type=pairs.weight.device.type, enabled=False):
            return self.weight * self.loss(student, teacher, pairs)

    @abstractmethod
    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        """The unweighted loss of the pairs, a () fp32 tensor."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairer={self.pairer}, heads={self.heads}"


def width_adapter(loss: str, student_channels: int | None, teacher_channels: int | None, make: Any) -> nn.Module:
    """The adapter of a loss comparing student vectors with a teacher's of another width:
    ``make(student_channels, teacher_channels)`` (a 1x1 conv, a Linear) when both are set and differ,
    else the identity. ConfigError when a width is set but not a positive integer."""
    for key, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"loss {loss!r}: {key} must be a positive integer, got {value!r}")
    differ = None not in (student_channels, teacher_channels) and student_channels != teacher_channels
    return make(student_channels, teacher_channels) if differ else nn.Identity()


def check_widths(loss: str, what: str, widths: tuple[int, int], configured: tuple[int | None, int | None], adapter: nn.Module, kind: str) -> None:
    """The pair's widths (student, teacher) against the loss's configured ones and its adapter (``kind``
    names it in the message): ConfigError naming the settings to write when they do not fit."""
    expected = (configured[0] or widths[0], configured[1] or widths[1])
    if tuple(widths) != expected:
        raise ConfigError(f"loss {loss!r}: configured for {expected[0]} student / {expected[1]} teacher channels, but the {what}s are {widths[0]} / {widths[1]}")
    if widths[0] != widths[1] and isinstance(adapter, nn.Identity):
        raise ConfigError(
            f"loss {loss!r}: student {what} {widths[0]}, teacher {widths[1]}; set student_channels: {widths[0]} and "
            f"teacher_channels: {widths[1]} to add a {kind} adapter"
        )


def check_same_classes(loss: str, student: DetectorSpec, teacher: DetectorSpec) -> None:
    if student.num_classes != teacher.num_classes:
        raise ConfigError(
            f"loss {loss!r}: student has {student.num_classes} classes, teacher {teacher.num_classes}; "
            "logit distillation needs the same class list (map classes with teacher.class_map)"
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


def loss_from_spec(spec) -> DistillLoss:
    """The loss a recipe's ``losses`` entry (``distill.config.LossSpec``) names, with its own parameters."""
    return create_loss(spec.name, weight=spec.weight, pairer=spec.pairer, pairer_params=spec.pairer_params, **spec.params)


def _get(name: str) -> type[DistillLoss]:
    if name not in _LOSSES:
        raise ConfigError(f"unknown distillation loss {name!r}; available: {', '.join(list_losses())}")
    return _LOSSES[name]
