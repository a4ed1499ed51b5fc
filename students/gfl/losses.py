"""GFL losses (Li et al., NeurIPS 2020): Quality Focal Loss, Distribution Focal Loss, GIoU.

All three return per-row losses without reduction or weighting; the detector applies the quality
weights and normalisers. Inputs are upcast to float32 so the losses stay exact under autocast,
and every log-probability comes from a log-sum-exp form, so logits of any size give finite values
and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


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
    logits = logits.float()
    num_classes = logits.shape[1]
    # Scatter into a spare background column, then drop it: no nonzero() and no host sync.
    # The target is data, never a path for gradients.
    target = logits.new_zeros(logits.shape[0], num_classes + 1)
    target.scatter_(1, labels.long()[:, None], quality.detach().float()[:, None])
    target = target[:, :num_classes]
    scale = (target - logits.sigmoid()).abs().pow(beta)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * scale).sum(dim=1)


def distribution_focal_loss(bin_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss: cross-entropy to the two bins around a continuous target.

    bin_logits: (K, R + 1); target: (K,) distances in bins within [0, R - eps].
    Returns (K,) float32: ``(y_r - y) * CE(y_l) + (y - y_l) * CE(y_r)`` with ``y_l = floor(y)``,
    ``y_r = y_l + 1``, which is minimal when the expected bin equals ``y``.
    """
    log_probs = bin_logits.float().log_softmax(dim=-1)
    max_bin = log_probs.shape[-1] - 1
    # Clamping keeps the gather in range (an out-of-range index is a device assert on CUDA);
    # at y = R the right weight is 0, so clamping its index changes nothing.
    target = target.detach().float().clamp(0, max_bin)
    left = target.floor().long()
    right = (left + 1).clamp(max=max_bin)
    weight_left = left.float() + 1 - target
    weight_right = target - left.float()
    nll_left = -log_probs.gather(1, left[:, None]).squeeze(1)
    nll_right = -log_probs.gather(1, right[:, None]).squeeze(1)
    return nll_left * weight_left + nll_right * weight_right


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """1 - GIoU of matched boxes. pred_boxes, target_boxes: (M, 4) xyxy. Returns (M,) float32."""
    return generalized_box_iou_loss(pred_boxes.float(), target_boxes.float(), reduction="none")
