"""Box helpers shared by assigners, heads, losses and region masks.

Pairwise IoU / GIoU / DIoU come from ``torchvision.ops``; this module adds only what torchvision
lacks: square anchors around dense locations, the distance <-> box coding of GFL, and the IoU of
row-aligned pairs (``box_iou`` would build an M x M matrix to read its diagonal).
All boxes are xyxy.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype

# ATSS's square anchors have side 8 x stride: GFL's assigner ranks locations with them and region
# VLR measures its IoUs with the same anchors.
ANCHOR_SCALE = 8.0


def square_anchors(points: Tensor, strides: Tensor, scale: float = ANCHOR_SCALE) -> Tensor:
    """Square boxes of side ``scale * stride`` centred on each location.

    points: (N, 2) xy centres; strides: (N,). Returns (N, 4) xyxy.
    GFL uses these only to rank and threshold locations (ATSS, VLR), never to regress from.
    """
    half = (scale * strides / 2).unsqueeze(1)
    return torch.cat([points - half, points + half], dim=1)


def distance2bbox(points: Tensor, distances: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
    """Decode (left, top, right, bottom) distances from centres into boxes.

    points: (..., 2); distances: (..., 4) in the same units. Returns (..., 4) xyxy, clipped to
    ``max_shape = (height, width)`` when given.
    """
    x1 = points[..., 0] - distances[..., 0]
    y1 = points[..., 1] - distances[..., 1]
    x2 = points[..., 0] + distances[..., 2]
    y2 = points[..., 1] + distances[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.stack(
            [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
            dim=-1,
        )
    return boxes


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
    """Encode boxes as (left, top, right, bottom) distances from centres.

    points: (..., 2); boxes: (..., 4). With ``max_dis`` the distances are clamped to
    ``[0, max_dis - eps]`` so that the right-hand DFL bin ``floor(d) + 1`` always exists.
    """
    left = points[..., 0] - boxes[..., 0]
    top = points[..., 1] - boxes[..., 1]
    right = boxes[..., 2] - points[..., 0]
    bottom = boxes[..., 3] - points[..., 1]
    dist = torch.stack([left, top, right, bottom], dim=-1)
    if max_dis is not None:
        dist = dist.clamp(min=0, max=max_dis - eps)
    return dist


def box_centers(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 2) xy centres."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def diou_iof_legacy(anchors: Tensor, gts: Tensor, eps: float = 1e-6) -> Tensor:
    """The "DIoU" of the official LD code's VLR: intersection over *anchor* area minus rho^2 / c^2.

    anchors: (N, 4); gts: (G, 4). Returns (N, G).
    rho is the distance between the box centres and c the diagonal of the smallest box enclosing
    both. The reference divides by area(anchor) (IoF) instead of the union, so the value is >= the
    true DIoU (``torchvision.ops.distance_box_iou``) and equals it when the GT lies inside the anchor.
    Kept only to reproduce the published VLR numbers.
    """
    anchors, gts = anchors.to(compute_dtype()), gts.to(compute_dtype())
    lt = torch.max(anchors[:, None, :2], gts[None, :, :2])
    rb = torch.min(anchors[:, None, 2:], gts[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (N, G)
    area_anchor = (anchors[:, 2:] - anchors[:, :2]).prod(dim=-1)  # (N,)
    iof = inter / area_anchor.clamp(min=eps)[:, None]

    enclose_lt = torch.min(anchors[:, None, :2], gts[None, :, :2])
    enclose_rb = torch.max(anchors[:, None, 2:], gts[None, :, 2:])
    diag_sq = (enclose_rb - enclose_lt).pow(2).sum(dim=-1)  # c^2
    rho_sq = (box_centers(anchors)[:, None] - box_centers(gts)[None]).pow(2).sum(dim=-1)
    return iof - rho_sq / diag_sq.clamp(min=eps)


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row-aligned boxes (..., 4), (..., 4) xyxy -> (...,)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)
