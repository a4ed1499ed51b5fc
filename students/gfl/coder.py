"""GFL box coding: per-edge distance distributions <-> boxes.

Each of the four edges (left, top, right, bottom) is predicted as a discrete distribution over
``reg_max + 1`` bins ``0, 1, ..., reg_max`` in stride units; the edge distance is its expectation.
Distances are measured from the location centre, so a box is ``centre -/+ distance * stride``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.ops.boxes import bbox2distance, distance2bbox
from distill.ops.precision import compute_dtype

# DFL needs the right-hand bin floor(d) + 1 <= reg_max to exist, hence targets stop short of reg_max.
TARGET_EPS = 0.1


def integral(bin_logits: Tensor) -> Tensor:
    """Expected bin index of each distribution.

    bin_logits: (..., reg_max + 1). Returns (...,) float32 distances in stride units.
    """
    probs = bin_logits.to(compute_dtype()).softmax(dim=-1)
    bins = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    # Elementwise product + sum rather than a matmul: autocast would run a matmul in half precision.
    return (probs * bins).sum(dim=-1)


def decode_boxes(points: Tensor, strides: Tensor, bin_logits: Tensor) -> Tensor:
    """Boxes in input pixels from per-edge bin logits.

    points: (N, 2) xy location centres; strides: (N,); bin_logits: (..., N, 4, reg_max + 1).
    Returns (..., N, 4) xyxy float32 (not clipped to the image).
    """
    distances = integral(bin_logits) * strides[:, None].to(compute_dtype())  # (..., N, 4) pixels
    return distance2bbox(points.to(compute_dtype()), distances)


def encode_targets(points: Tensor, strides: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """DFL targets: distances from centres to box sides in stride units.

    points: (..., 2); strides: (...,); boxes: (..., 4). Returns (..., 4) clamped to
    ``[0, reg_max - 0.1]``.
    """
    scale = strides.to(compute_dtype())[..., None]
    return bbox2distance(points.to(compute_dtype()) / scale, boxes.to(compute_dtype()) / scale, max_dis=reg_max, eps=TARGET_EPS)
