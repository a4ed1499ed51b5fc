"""ATSS label assignment (Zhang et al., CVPR 2020) for one image, fully vectorised over GTs.

For every GT, the ``topk`` anchors closest to its centre on each pyramid level are candidates; the
GT's IoU threshold is the mean + std of its candidates' IoUs, so it adapts to the GT's size and
shape instead of using one fixed IoU cut. A candidate is positive when its IoU reaches the
threshold and its centre lies strictly inside the GT. GFL uses the anchors only to rank and
threshold locations; regression starts from the location centre.

Invalid anchors (batch padding) are never candidates and never positive. Ties in centre distance
at the top-k cut are broken arbitrarily (as in the reference implementations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from distill.ops.boxes import box_centers
from distill.ops.precision import compute_dtype

# An anchor centre closer than this (px) to a GT side counts as outside the GT.
INSIDE_EPS = 0.01


@dataclass
class AtssResult:
    """Assignment of one image.

    labels:         (N,) int64, GT label at positives, ``num_classes`` (background) elsewhere.
    matched_gt:     (N,) int64 index into the GT boxes, -1 for negatives.
    pos_mask:       (N,) bool.
    ious:           (N, G) IoU of anchors with GTs, rows of invalid anchors are 0.
    pos_thresholds: (G,) alpha_pos = mean + std of each GT's candidate IoUs (reused by VLR).
    """

    labels: Tensor
    matched_gt: Tensor
    pos_mask: Tensor
    ious: Tensor
    pos_thresholds: Tensor


def atss_assign(
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    valid: Tensor | None = None,
    topk: int = 9,
) -> AtssResult:
    """Assign anchors of one image to GTs with ATSS.

    anchors:       (N, 4) xyxy, levels concatenated in the order of ``num_per_level``.
    num_per_level: anchors per level, summing to N.
    gt_boxes:      (G, 4) xyxy; gt_labels: (G,) int64 in [0, num_classes).
    valid:         (N,) bool, False for anchors on batch padding; None means all valid.
    topk:          candidates per level and GT (fewer when a level has fewer valid anchors).
    """
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_per_level) != num_anchors:
        raise ValueError(f"num_per_level sums to {sum(num_per_level)} but there are {num_anchors} anchors")
    device = anchors.device
    anchors, gt_boxes = anchors.to(compute_dtype()), gt_boxes.to(compute_dtype())
    if valid is None:
        valid = torch.ones(num_anchors, dtype=torch.bool, device=device)

    labels = torch.full((num_anchors,), num_classes, dtype=torch.long, device=device)
    matched_gt = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
    if num_gts == 0 or num_anchors == 0:
        # Nothing to match: every anchor is background (empty-GT images are legal training input).
        return AtssResult(
            labels=labels,
            matched_gt=matched_gt,
            pos_mask=torch.zeros(num_anchors, dtype=torch.bool, device=device),
            ious=anchors.new_zeros(num_anchors, num_gts),
            pos_thresholds=anchors.new_zeros(num_gts),
        )

    ious = box_iou(anchors, gt_boxes) * valid[:, None]  # (N, G)
    anchor_ctr = box_centers(anchors)
    # Squared distances rank like distances; computed explicitly (not cdist's matmul trick) so the
    # ranking is exact. Invalid anchors go to the end of every ranking.
    delta = anchor_ctr[:, None] - box_centers(gt_boxes)[None]  # (N, G, 2)
    dist = delta[..., 0].square() + delta[..., 1].square()
    dist = dist.masked_fill(~valid[:, None], float("inf"))

    candidates = []  # per level (k_l, G) global anchor indices
    start = 0
    for count in num_per_level:
        if count > 0:
            k = min(topk, count)
            _, idx = dist[start : start + count].topk(k, dim=0, largest=False)
            candidates.append(idx + start)
        start += count
    cand = torch.cat(candidates, dim=0)  # (K, G)
    # A level with fewer than topk valid anchors contributes its invalid ones at the end; drop them.
    cand_valid = valid[cand]  # (K, G)
    cand_ious = ious.gather(0, cand)  # (K, G)

    num_cand = cand_valid.sum(0).to(compute_dtype())  # (G,)
    mean = (cand_ious * cand_valid).sum(0) / num_cand.clamp(min=1)
    # Unbiased std like torch.std; a single candidate has no spread, so its std is 0 (not NaN).
    var = ((cand_ious - mean).pow(2) * cand_valid).sum(0) / (num_cand - 1).clamp(min=1)
    thresholds = mean + var.sqrt()  # (G,)

    # Centre strictly inside the GT: all four distances to its sides above INSIDE_EPS.
    ctr = anchor_ctr[cand]  # (K, G, 2)
    side_dist = torch.cat([ctr - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - ctr], dim=-1)
    inside = side_dist.amin(dim=-1) > INSIDE_EPS
    is_pos = (cand_ious >= thresholds[None]) & inside & cand_valid  # (K, G)

    # An anchor positive for several GTs keeps the one it overlaps most. Candidate indices are
    # unique per GT column, so the scatter has no collisions.
    claims = torch.full_like(ious, float("-inf"))
    claims.scatter_(0, cand, cand_ious.masked_fill(~is_pos, float("-inf")))
    best_iou, best_gt = claims.max(dim=1)
    pos_mask = best_iou > float("-inf")

    matched_gt = torch.where(pos_mask, best_gt, matched_gt)
    labels = torch.where(pos_mask, gt_labels.to(device=device, dtype=torch.long)[best_gt], labels)
    return AtssResult(labels=labels, matched_gt=matched_gt, pos_mask=pos_mask, ious=ious, pos_thresholds=thresholds)
