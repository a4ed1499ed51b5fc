"""GFL losses (Li et al., NeurIPS 2020): Quality Focal Loss, GIoU; Distribution Focal Loss lives in
``students.common.losses`` (the sparse bins head uses it too) and is re-exported here.

All three return per-row losses without reduction or weighting; the detector applies the quality
weights and normalisers. Inputs are upcast to float32 so the losses stay exact under autocast,
and every log-probability comes from a log-sum-exp form, so logits of any size give finite values
and gradients.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from distill.ops.precision import compute_dtype
from students.common.losses import distribution_focal_loss  # noqa: F401  (re-exported; shared with the sparse family)


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss summed over classes.

    logits:  (M, C) joint class-quality logits (sigmoid).
    labels:  (M,) int64, GT class at positives, C (background) elsewhere.
    quality: (M,) IoU target of each positive (ignored at background rows).
    Returns (M,) float32.

    The target is ``quality`` at the GT-class element of positives and 0 everywhere else; each
    element is BCE(x, y) scaled by ``|y - sigmoid(x)|^beta``. For target 0 the scale is
    ``sigmoid(x)^beta``, the focal down-weighting of easy negatives.
    """
    logits = logits.to(compute_dtype())
    num_classes = logits.shape[1]
    # Scatter into a spare background column, then drop it: no nonzero() and no host sync.
    # The target is data, never a path for gradients.
    target = logits.new_zeros(logits.shape[0], num_classes + 1)
    target.scatter_(1, labels.long()[:, None], quality.detach().to(compute_dtype())[:, None])
    target = target[:, :num_classes]
    scale = (target - logits.sigmoid()).abs().pow(beta)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * scale).sum(dim=1)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """1 - GIoU of matched boxes. pred_boxes, target_boxes: (M, 4) xyxy. Returns (M,) float32."""
    return generalized_box_iou_loss(pred_boxes.to(compute_dtype()), target_boxes.to(compute_dtype()), reduction="none")
