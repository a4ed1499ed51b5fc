"""Localization distillation (``ld``): KL between the teacher's and student's box-edge distributions.

Rows are the 4 edges (left, top, right, bottom) of every selected location; each row holds the
``reg_max + 1`` bin logits of one edge. Row loss = ``T^2 * mean_bins KL(p_T || q_S)`` with
temperature T (tau, default 10) — the official LD code's kernel, so its weight 0.25 applies.

Row weights: the region mask value, times the student's quality weight ``w``
(``Assignment.quality_weight``, max class sigmoid at positives, detached) when ``weight_by_quality``.
By default quality weighting is on for the ``main`` region, as in the reference, and off elsewhere;
``w`` is 0 outside the student's positives, so asking for it on another region is a ConfigError.

Normalisation:
- default: ``sum_rows weight * KL / sum_rows weight`` — the weighted mean over distilled edges, as GFL
  normalises DFL by ``sum w``. Duplicating the batch leaves it unchanged.
- ``normalize="count"``: ``sum_rows weight * KL / (number of rows with a positive mask)`` — the mean
  over distilled edges of ``w * KL``. Still batch-size independent, but, like the reference, the
  term stays small while the student's quality scores ``w`` are small (early training) and grows
  as the student becomes confident: a built-in warm-up. ``normalize="weight"`` is the default above.
- ``legacy=True``: the reference's ``sum_rows weight * KL / avg_factor`` with a constant avg_factor
  (4 for Main LD, 16 for VLR LD; ``legacy_avg_factor`` overrides). This grows linearly with the number
  of images per device — a known bug of the reference (HikariTJU/LD#78) kept only for comparison.

Different bin counts: ``resample_bins="off"`` (default) refuses with a ConfigError;
``"distance"`` moves the teacher's mass at bin k (distance k strides) to the same distance on the
student's bins, piling mass beyond the student's range onto its last bin — decoded boxes keep their
size; ``"scale"`` maps bin k to ``k * R_s / R_t`` (same relative position, different box size).
Mass falling between two student bins is split linearly, then rows are renormalised.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.losses.kl import softmax_kl, softmax_kl_to_probs, weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, check_mask, check_same_locations, register_loss

RESAMPLE_MODES = ("off", "distance", "scale")
LEGACY_AVG_FACTOR = {"main": 4.0, "vlr": 16.0}  # reference constants; other regions use 4


def resample_bins(probs: Tensor, num_bins: int, mode: str = "distance") -> Tensor:
    """(R, K_t) distributions -> (R, num_bins) distributions on the student's bins.

    mode ``"distance"``: source bin k lands at position min(k, num_bins - 1);
    mode ``"scale"``: at ``k * (num_bins - 1) / (K_t - 1)``. A position between bins j and j + 1 gives
    its mass to both in proportion to proximity (the same split DFL uses for its targets).
    """
    k_t = probs.shape[-1]
    src = torch.arange(k_t, dtype=torch.float32, device=probs.device)
    if mode == "scale":
        pos = src * ((num_bins - 1) / (k_t - 1)) if k_t > 1 else src
    elif mode == "distance":
        pos = src.clamp(max=num_bins - 1)
    else:
        raise ValueError(f"resample mode must be 'distance' or 'scale', got {mode!r}")
    left = pos.floor().long().clamp(max=num_bins - 1)
    right = (left + 1).clamp(max=num_bins - 1)
    frac = pos - left
    transfer = torch.zeros(k_t, num_bins, device=probs.device)  # (K_t, K_s), rows sum to 1
    transfer.index_put_((src.long(), left), 1.0 - frac, accumulate=True)
    transfer.index_put_((src.long(), right), frac, accumulate=True)
    out = probs.float() @ transfer
    return out / out.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def ld_rows(
    student_bins: Tensor,
    teacher_bins: Tensor,
    weights: Tensor,
    normalizer: Tensor | float,
    temperature: float = 10.0,
    resample: str = "off",
) -> Tensor:
    """(R, K_s) student logits, (R, K_t) teacher logits, (R,) weights -> () weighted KL sum / normalizer.

    With ``K_s != K_t`` the teacher's softened distribution is resampled to K_s bins (``resample``
    must then be "distance" or "scale").
    """
    if teacher_bins.shape[-1] == student_bins.shape[-1]:
        row_loss = softmax_kl(student_bins, teacher_bins, temperature)
    else:
        probs = torch.softmax(teacher_bins.detach().float() / temperature, dim=-1)
        target = resample_bins(probs, student_bins.shape[-1], resample)
        row_loss = softmax_kl_to_probs(student_bins, target, temperature)
    return weighted_sum(row_loss, weights, normalizer)


@register_loss
class LocalizationDistillation(DistillLoss):
    """LD on the per-edge bin distributions of a GFL-style head. Default T = 10."""

    name = "ld"
    needs = frozenset({"head"})
    legacy_sums_over_batch = True

    def __init__(
        self,
        *,
        weight: float = 1.0,
        region: str = "main",
        region_params: Mapping[str, Any] | None = None,
        temperature: float = 10.0,
        weight_by_quality: bool | None = None,
        legacy: bool = False,
        legacy_avg_factor: float | None = None,
        resample_bins: str | bool = "off",
        normalize: str = "weight",
    ):
        super().__init__(weight=weight, region=region, region_params=region_params)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"loss 'ld': temperature must be > 0, got {temperature!r}")
        if weight_by_quality is None:
            weight_by_quality = self.region.name == "main"
        elif weight_by_quality and self.region.name != "main":
            raise ConfigError(
                f"loss 'ld': weight_by_quality needs region 'main' (the student's quality weight is 0 outside "
                f"its positives), got region {self.region.name!r}"
            )
        if isinstance(resample_bins, bool):  # YAML "resample_bins: true"
            resample_bins = "distance" if resample_bins else "off"
        if resample_bins not in RESAMPLE_MODES:
            raise ConfigError(f"loss 'ld': resample_bins must be one of {RESAMPLE_MODES}, got {resample_bins!r}")
        if legacy_avg_factor is not None and not legacy_avg_factor > 0:
            raise ConfigError(f"loss 'ld': legacy_avg_factor must be > 0, got {legacy_avg_factor!r}")
        self.temperature = float(temperature)
        self.weight_by_quality = bool(weight_by_quality)
        self.legacy = bool(legacy)
        self.legacy_avg_factor = float(legacy_avg_factor or LEGACY_AVG_FACTOR.get(self.region.name, 4.0))
        self.resample_bins = resample_bins
        if normalize not in ("weight", "count"):
            raise ConfigError(f"loss 'ld': normalize must be 'weight' or 'count', got {normalize!r}")
        self.normalize = normalize

    def loss(self, student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor:
        s_out, t_out = student.require_outputs("box-bin logits"), teacher.require_outputs("box-bin logits")
        self._check_pair(s_out.reg_max, t_out.reg_max)
        check_same_locations(s_out, t_out, self.name)
        check_mask(mask, s_out.reg_logits[0].shape[0], s_out.points.shape[0], self.name)

        weights = mask
        if self.weight_by_quality:
            if student.assignment is None:
                raise ValueError("loss 'ld': weight_by_quality needs the student's Assignment")
            weights = mask * student.assignment.quality_weight.detach().float()
        select = weights > 0  # (B, N)
        s_rows, t_rows = student.reg_rows(select), teacher.reg_rows(select)  # (M, 4, K_s), (M, 4, K_t)
        row_weights = weights[select].repeat_interleave(4)  # (M * 4,): one weight per edge
        if self.legacy:
            normalizer = self.legacy_avg_factor
        elif self.normalize == "count":
            normalizer = torch.tensor(float(row_weights.numel()), device=row_weights.device).clamp(min=1.0)
        else:
            normalizer = row_weights.sum()
        return ld_rows(
            s_rows.flatten(0, 1), t_rows.flatten(0, 1), row_weights, normalizer, self.temperature, self.resample_bins
        )

    def _check_pair(self, student_reg_max: int, teacher_reg_max: int) -> None:
        if student_reg_max != teacher_reg_max and self.resample_bins == "off":
            raise ConfigError(
                f"loss 'ld': teacher reg_max {teacher_reg_max} != student reg_max {student_reg_max}, so their edge "
                "distributions live on different bins; set resample_bins: distance (or scale) to map the teacher's "
                "bins onto the student's"
            )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, weight_by_quality={self.weight_by_quality}, "
            f"legacy={self.legacy}, resample_bins={self.resample_bins!r}"
        )
