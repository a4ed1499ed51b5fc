"""Classification logit distillation (``kd``) for sigmoid-based dense heads (GFL).

Rows are the class-logit vectors (C,) of the locations the region selects; row weight = mask value.

- ``mode="bce"`` (default, our extension): per-class binary KL between sigmoid(t/T) and sigmoid(s/T),
  mean over classes, x T^2. Matches how GFL's joint class-quality scores are trained and works for a
  single class.
- ``mode="softmax"``: the official LD code's ``loss_kd`` — KL between softmaxes over the C classes of
  the sigmoid logits, mean over classes, x T^2 (ld-gfl-spec §2.4). With C = 1 the softmax is the
  constant 1, so this mode is identically 0 (a one-time warning says so).

Normalisation: ``sum_rows w * KL / sum_rows w`` (weighted mean over the selected rows), independent of
the batch size. ``legacy=True`` reproduces the reference: a mean per FPN level, summed over levels
(its ``avg_factor`` is the level's number of positives).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.losses.kl import binary_kl, softmax_kl, weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, check_mask, check_same_locations, register_loss

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
        region: str = "main",
        region_params: Mapping[str, Any] | None = None,
        temperature: float = 2.0,
        mode: str = "bce",
        legacy: bool = False,
    ):
        super().__init__(weight=weight, region=region, region_params=region_params)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"loss 'kd': temperature must be > 0, got {temperature!r}")
        if mode not in KD_MODES:
            raise ConfigError(f"loss 'kd': mode must be one of {sorted(KD_MODES)}, got {mode!r}")
        self.temperature = float(temperature)
        self.mode = mode
        self.legacy = bool(legacy)
        self._warned_single_class = False

    def loss(self, student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor:
        s_out, t_out = student.require_outputs("class logits"), teacher.require_outputs("class logits")
        if s_out.num_classes != t_out.num_classes:
            raise ConfigError(
                f"loss 'kd': student has {s_out.num_classes} classes, teacher {t_out.num_classes}; "
                "classification KD needs the same class list"
            )
        check_same_locations(s_out, t_out, self.name)
        check_mask(mask, s_out.cls_logits[0].shape[0], s_out.points.shape[0], self.name)
        self._warn_if_degenerate(s_out.num_classes)

        select = mask > 0  # (B, N)
        weights = mask[select]  # (M,)
        s_rows, t_rows = student.cls_rows(select), teacher.cls_rows(select)  # (M, C) each
        if not self.legacy:
            return kd_rows(s_rows, t_rows, weights, weights.sum(), self.temperature, self.mode)
        # Reference: each level is a mean over its own rows, then levels are summed.
        level = _level_index(s_out.level_sizes, mask.device).expand_as(mask)[select]  # (M,)
        per_level = torch.zeros(len(s_out.level_sizes), device=mask.device).index_add_(0, level, weights)
        return kd_rows(s_rows, t_rows, weights / per_level[level], 1.0, self.temperature, self.mode)

    def _warn_if_degenerate(self, num_classes: int) -> None:
        if self.mode == "softmax" and num_classes == 1 and not self._warned_single_class:
            warnings.warn("loss 'kd' with mode='softmax' is identically 0 for one class; use mode='bce'", stacklevel=3)
            self._warned_single_class = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, mode={self.mode!r}, legacy={self.legacy}"


def _level_index(level_sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """(1, N) int64 FPN level of every flattened location."""
    counts = torch.tensor([h * w for h, w in level_sizes], device=device)
    return torch.repeat_interleave(torch.arange(len(level_sizes), device=device), counts).unsqueeze(0)
