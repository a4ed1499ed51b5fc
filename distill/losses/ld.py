"""Localization distillation (``ld``): KL between the teacher's and student's box-edge distributions.

Rows are the 4 edges (left, top, right, bottom) of every pair; each row holds the K bin logits of
one edge. Row loss = ``T^2 * mean_bins KL(p_T || q_S)`` with
temperature T (tau, default 10) — the official LD code's kernel, so its weight 0.25 applies.

Row weights: the pair's weight, times the student's quality weight ``w`` (its match weight, GFL:
max class sigmoid at positives, detached) when ``weight_by_quality``.
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

Reference frames. A dense pairer compares the same location of two GFL heads: both measure edges
from the same point in the same stride units, so bin k means the same distance on both sides.
Matched pairs do not share a frame (a sparse head measures from its proposal centre in units of the
proposal size, a GFL head from its location in strides): the teacher's distribution is then
**re-encoded** in the student's bins — the mass at teacher bin k sits at a pixel position of the
edge, which is expressed as a distance from the student's centre in the student's spacing
(:func:`reencode_bins`) — and compared there. Mass beyond the student's range lands on its end bins.

Different bin counts on a shared grid: ``resample_bins="off"`` (default) refuses with a ConfigError;
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
from distill.losses.registry import DistillInputs, DistillLoss, register_loss
from distill.ops.precision import compute_dtype
from distill.pairers import RegionPairer
from distill.structures import DetectorSpec, Pairs

RESAMPLE_MODES = ("off", "distance", "scale")


def resample_bins(probs: Tensor, num_bins: int, mode: str = "distance") -> Tensor:
    """(R, K_t) distributions -> (R, num_bins) distributions on the student's bins.

    mode ``"distance"``: source bin k lands at position min(k, num_bins - 1);
    mode ``"scale"``: at ``k * (num_bins - 1) / (K_t - 1)``. A position between bins j and j + 1 gives
    its mass to both in proportion to proximity (the same split DFL uses for its targets).
    """
    k_t = probs.shape[-1]
    src = torch.arange(k_t, dtype=compute_dtype(), device=probs.device)
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
    out = probs.to(compute_dtype()) @ transfer
    return out / out.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def reencode_bins(
    probs: Tensor, teacher_centers: Tensor, teacher_spacing: Tensor, student_centers: Tensor, student_spacing: Tensor, num_bins: int
) -> Tensor:
    """Teacher edge distributions -> the same edge positions as distributions on the student's bins.

    probs: (R, 4, K_t) teacher probabilities, edges (left, top, right, bottom); centers: (R, 2) xy;
    spacing: (R, 4) pixels per bin. Teacher bin k puts its edge at ``c_t -/+ k * u_t``; from the
    student's centre that is ``+/-(c_s - c_t) + k * u_t`` pixels, i.e. position ``pos`` in student
    bins, clamped to ``[0, K_s - 1]`` and split linearly between the two nearest bins (as DFL targets).
    Returns (R, 4, num_bins), rows summing to 1.
    """
    delta = (student_centers - teacher_centers).to(compute_dtype())  # (R, 2)
    offset = torch.stack([delta[:, 0], delta[:, 1], -delta[:, 0], -delta[:, 1]], dim=-1)  # (R, 4) px
    k = torch.arange(probs.shape[-1], device=probs.device, dtype=compute_dtype())
    pos = (offset[..., None] + k * teacher_spacing.to(compute_dtype())[..., None]) / student_spacing.to(compute_dtype())[..., None]  # (R, 4, K_t)
    # Centres of diverged predictions are NaN; a NaN cast to long is an arbitrary index (a crash),
    # so index those rows at 0 and make them NaN: the loss reaches the trainer's non-finite guard.
    finite = torch.isfinite(pos)
    pos = torch.where(finite, pos, torch.zeros_like(pos)).clamp(0, num_bins - 1)
    left = pos.floor().long().clamp(max=num_bins - 1)
    right = (left + 1).clamp(max=num_bins - 1)
    frac = pos - left
    p = probs.to(compute_dtype())
    out = torch.zeros(*probs.shape[:-1], num_bins, device=probs.device)
    out = out.scatter_add_(-1, left, p * (1 - frac)).scatter_add_(-1, right, p * frac)
    return out.masked_fill(~finite.all(-1, keepdim=True), float("nan"))


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
        probs = torch.softmax(teacher_bins.detach().to(compute_dtype()) / temperature, dim=-1)
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
        pairer: str = "main",
        pairer_params: Mapping[str, Any] | None = None,
        heads: str = "final",
        temperature: float = 10.0,
        weight_by_quality: bool | None = None,
        legacy: bool = False,
        legacy_avg_factor: float | None = None,
        resample_bins: str | bool = "off",
        normalize: str = "weight",
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params, heads=heads)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"loss 'ld': temperature must be > 0, got {temperature!r}")
        if weight_by_quality is None:
            weight_by_quality = self.pairer.on_student_positives
        elif weight_by_quality and not self.pairer.on_student_positives:
            raise ConfigError(
                f"loss 'ld': weight_by_quality needs pairer 'main' (the student's quality weight is 0 outside "
                f"its positives), got pairer {self.pairer.name!r}"
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
        self.legacy_avg_factor = float(legacy_avg_factor or self.pairer.ld_reference_avg_factor)
        self.resample_bins = resample_bins
        if normalize not in ("weight", "count"):
            raise ConfigError(f"loss 'ld': normalize must be 'weight' or 'count', got {normalize!r}")
        self.normalize = normalize

    @property
    def shared_frame(self) -> bool:
        """Dense pairs: the same location of two grids with the same strides, so the same bin frame."""
        return isinstance(self.pairer, RegionPairer)

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        super().check_pair(student, teacher)
        for side, spec in (("student", student), ("teacher", teacher)):
            if spec.bins is None:
                raise ConfigError(
                    f"loss 'ld': the {side} ({spec.family}) has no distribution box head (per-edge bins); LD compares "
                    "edge distributions, so both detectors need one (GFL, or a sparse head with bins)"
                )
        if self.shared_frame and student.bins != teacher.bins and self.resample_bins == "off":
            raise ConfigError(
                f"loss 'ld': teacher reg_max {teacher.bins - 1} != student reg_max {student.bins - 1}, so their edge "
                "distributions live on different bins; set resample_bins: distance (or scale) to map the teacher's "
                "bins onto the student's"
            )

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        if self.weight_by_quality:
            quality = student.match_weights()[pairs.image, pairs.student]  # (R,) detached
            pairs = pairs.reweight(pairs.weight * quality)
        s_rows = student.bin_rows(pairs.image, pairs.student)  # (R, 4, K_s)
        t_rows = teacher.bin_rows(pairs.image, pairs.teacher)  # (R, 4, K_t)
        row_weights = pairs.weight.repeat_interleave(4)  # (R * 4,): one weight per edge
        if self.legacy:
            normalizer = self.legacy_avg_factor
        elif self.normalize == "count":
            normalizer = torch.tensor(float(row_weights.numel()), device=row_weights.device).clamp(min=1.0)
        else:
            normalizer = row_weights.sum()
        if self.shared_frame:
            return ld_rows(
                s_rows.flatten(0, 1), t_rows.flatten(0, 1), row_weights, normalizer, self.temperature, self.resample_bins
            )
        probs = torch.softmax(t_rows.detach().to(compute_dtype()) / self.temperature, dim=-1)
        target = reencode_bins(
            probs, *teacher.bin_references(pairs.image, pairs.teacher), *student.bin_references(pairs.image, pairs.student), s_rows.shape[-1]
        )
        row_loss = softmax_kl_to_probs(s_rows.flatten(0, 1), target.flatten(0, 1), self.temperature)
        return weighted_sum(row_loss, row_weights, normalizer)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, weight_by_quality={self.weight_by_quality}, "
            f"legacy={self.legacy}, resample_bins={self.resample_bins!r}"
        )
