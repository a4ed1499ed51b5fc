"""Traceable postprocess pieces: every size they use is read from a tensor in the graph, so the
exported file runs at any batch size (a Python int taken from a shape would be frozen by tracing)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["clamped_k", "image_index", "padded_nms"]


def clamped_k(x: Tensor, k: int, dim: int) -> int | Tensor:
    """``min(k, x.shape[dim])`` as top-k's k: a graph value while tracing (TopK reads k as an input), so
    a k larger than the candidates never becomes a fixed, too large constant."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(x)[dim], max=k)
    return min(k, x.shape[dim])


def image_index(x: Tensor) -> Tensor:
    """(B, K) -> (B, K) int64 row index b, built from ``x`` itself (no Python batch size)."""
    ones = torch.ones_like(x, dtype=torch.int64)
    return ones.cumsum(0) - 1


def padded_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou: float, score_thresh: float, max_detections: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-aware NMS of each image, all images in one call, to ``max_detections`` padded rows.

    boxes (B, K, 4), scores (B, K), labels (B, K) int64. A candidate survives if it is above
    ``score_thresh`` and no higher-scored box of its image and class overlaps it by more than ``iou``
    (a box under the threshold scores lower than every kept one, so it never suppresses one).
    Returns boxes (B, D, 4), scores (B, D), labels (B, D), valid (B, D) bool with
    ``D = min(max_detections, K)``, scores descending, invalid rows zero.
    """
    groups = image_index(scores) * num_classes + labels  # NMS never compares two images or two classes
    keep = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), groups.reshape(-1), iou)
    flat = scores.reshape(-1)
    kept = torch.zeros_like(flat).scatter(0, keep, torch.ones_like(keep, dtype=flat.dtype)) > 0
    kept = (kept & (flat > score_thresh)).reshape(scores.shape)
    ranked = torch.where(kept, scores, torch.full_like(scores, -1.0))
    top, index = ranked.topk(clamped_k(ranked, max_detections, 1), dim=1)
    valid = kept.gather(1, index)
    out_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4)) * valid[..., None]
    return out_boxes, torch.where(valid, top, torch.zeros_like(top)), labels.gather(1, index) * valid, valid
