"""Classification logit distillation (``kd``) for sigmoid-based heads (GFL, sparse query heads).

Rows are the class-logit vectors (C,) of each pair, the student's and the teacher's read with their
own index; row weight = the pair's weight (a region's mask value, a teacher's confidence).

- ``mode="bce"`` (default, our extension): per-class binary KL between sigmoid(t/T) and sigmoid(s/T),
  mean over classes, x T^2. Matches how GFL's joint class-quality scores are trained and works for a
  single class.
- ``mode="softmax"``: the official LD code's ``loss_kd`` — KL between softmaxes over the C classes of
  the sigmoid logits, mean over classes, x T^2 (ld-gfl-spec §2.4). With C = 1 the softmax is the
  constant 1, so this mode is identically 0 (a one-time warning says so).

Normalisation: ``sum_rows w * KL / sum_rows w`` (weighted mean over the pairs), independent of the
batch size. ``legacy=True`` reproduces the reference: a mean per FPN level, summed over levels (its
``avg_factor`` is the level's number of positives); it needs a dense student.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.losses.kl import binary_kl, softmax_kl, weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, check_same_classes, register_loss
from distill.structures import DenseOutputs, DetectorSpec, Pairs

KD_MODES = {"bce": binary_kl, "softmax": softmax_kl}


def kd_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    normalizer: Tensor | float,
    temperature: float = 2.0,
    mode: str = "bce",
) -> Tensor:
    """(R, C), (R, C), (R,) -> () ``sum_r w_r * KL_r / normalizer`` with KL from ``KD_MODES[mode]``."""
    return weighted_sum(KD_MODES[mode](student_logits, teacher_logits, temperature), weights, normalizer)


@register_loss
class ClassificationKD(DistillLoss):
    """Temperature KD on the dense class logits. Default T = 2 (the reference's value)."""

    name = "kd"
    needs = frozenset({"head"})

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "main",
        pairer_params: Mapping[str, Any] | None = None,
        heads: str = "final",
        temperature: float = 2.0,
        mode: str = "bce",
        legacy: bool = False,
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params, heads=heads)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"loss 'kd': temperature must be > 0, got {temperature!r}")
        if mode not in KD_MODES:
            raise ConfigError(f"loss 'kd': mode must be one of {sorted(KD_MODES)}, got {mode!r}")
        self.temperature = float(temperature)
        self.mode = mode
        self.legacy = bool(legacy)
        self._warned_single_class = False

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        super().check_pair(student, teacher)
        check_same_classes(self.name, student, teacher)
        if self.legacy and student.family != "dense":
            raise ConfigError("loss 'kd': legacy=True normalises per FPN level, which needs a dense student")

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        self._warn_if_degenerate(student.require_predictions("class logits").num_classes)
        s_rows = student.cls_rows(pairs.image, pairs.student)  # (R, C)
        t_rows = teacher.cls_rows(pairs.image, pairs.teacher)  # (R, C)
        weights = pairs.weight  # (R,)
        if not self.legacy:
            return kd_rows(s_rows, t_rows, weights, weights.sum(), self.temperature, self.mode)
        # Reference: each level is a mean over its own rows, then levels are summed.
        grid = student.predictions
        if not isinstance(grid, DenseOutputs):
            raise ConfigError("loss 'kd': legacy=True normalises per FPN level, which needs a dense student")
        level = grid.level_of(pairs.student)  # (R,)
        per_level = torch.zeros(len(grid.level_sizes), device=weights.device).index_add_(0, level, weights)
        return kd_rows(s_rows, t_rows, weights / per_level[level], 1.0, self.temperature, self.mode)

    def _warn_if_degenerate(self, num_classes: int) -> None:
        if self.mode == "softmax" and num_classes == 1 and not self._warned_single_class:
            warnings.warn("loss 'kd' with mode='softmax' is identically 0 for one class; use mode='bce'", stacklevel=3)
            self._warned_single_class = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, mode={self.mode!r}, legacy={self.legacy}"
