"""Box distillation (``box``): L1 + GIoU between each paired student box and teacher box.

The DETR-family box terms with the teacher's box as the target (DETRDistill, KD-DETR):
``sum_r w_r * (l1_weight * |b_s - b_t|_1 + giou_weight * (1 - GIoU(b_s, b_t))) / sum_r w_r``.
L1 is on boxes divided by the image's (w, h, w, h), as DETR's normalised coordinates, so its weight
means the same at every input size. Works on any pairs (dense or matched) of any two detectors;
the teacher's box is a constant.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from distill.errors import ConfigError
from distill.losses.kl import weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, register_loss
from distill.ops.precision import compute_dtype
from distill.structures import Pairs


def box_rows(student_boxes: Tensor, teacher_boxes: Tensor, scale: Tensor, weights: Tensor, l1_weight: float, giou_weight: float) -> Tensor:
    """(R, 4) xyxy student / teacher boxes, (R, 4) per-row scale (w, h, w, h), (R,) weights -> ().

    Weighted mean over rows of ``l1_weight * L1(b_s / scale, b_t / scale) + giou_weight * (1 - GIoU)``.
    """
    s, t = student_boxes.to(compute_dtype()), teacher_boxes.detach().to(compute_dtype())
    l1 = ((s - t).abs() / scale).sum(dim=-1)  # (R,)
    giou = generalized_box_iou_loss(s, t, reduction="none") if len(s) else s.new_zeros(0)  # (R,) 1 - GIoU
    return weighted_sum(l1_weight * l1 + giou_weight * giou, weights, weights.sum())


def pair_scales(student: DistillInputs, pairs: Pairs, loss: str) -> Tensor:
    """(R, 4) (w, h, w, h) of each pair's image: what L1 on image-normalised boxes divides by."""
    if student.image_sizes is None:
        raise ValueError(f"loss {loss!r} needs the image sizes (L1 is relative to the image)")
    hw = student.image_sizes.to(pairs.weight.device, compute_dtype())[pairs.image]  # (R, 2)
    return torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)


@register_loss
class BoxDistillation(DistillLoss):
    """L1 (weight 5) + GIoU (weight 2) to the teacher's boxes on every pair (spec §10.2 defaults)."""

    name = "box"
    needs = frozenset({"head"})

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "gt_bridged",
        pairer_params: Mapping[str, Any] | None = None,
        heads: str = "final",
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params, heads=heads)
        for key, value in (("l1_weight", l1_weight), ("giou_weight", giou_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss 'box': {key} must be a finite number >= 0, got {value!r}")
        self.l1_weight, self.giou_weight = float(l1_weight), float(giou_weight)

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        s_boxes = student.box_rows(pairs.image, pairs.student)  # (R, 4)
        t_boxes = teacher.box_rows(pairs.image, pairs.teacher)  # (R, 4)
        return box_rows(s_boxes, t_boxes, pair_scales(student, pairs, self.name), pairs.weight, self.l1_weight, self.giou_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, l1_weight={self.l1_weight}, giou_weight={self.giou_weight}"
