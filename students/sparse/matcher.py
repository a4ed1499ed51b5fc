"""One-to-one Hungarian matching of queries to ground truth (DETR / ASAG, spec §5 and §11).

Cost per (query i, GT j) of one image, over valid queries only::

    C_ij = [w_cls * (focal_pos - focal_neg)(sigmoid(z_i, c_j)) + w_l1 * |b_i - g_j|_1 + w_giou * (-GIoU(b_i, g_j))] * a(g_j)

with boxes as image-normalised cxcywh for L1 and pixels for GIoU, and ``a(g) = A - (A - 1) sqrt(w h)``
the optional area weight of the official code (``area_weight = A``; 1 = off, the paper's cost).
Query Weighting never enters the cost. With query groups (Group DETR) every group is matched to
all GTs on its own, so each GT gets one query per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from distill.ops.precision import compute_dtype
from distill.structures import Matches, Predictions, Target
from students.sparse.box_ops import normalize_boxes

__all__ = ["HungarianMatcher", "solve_assignment", "area_weight", "focal_cost"]


def focal_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal classification cost of Deformable DETR, elementwise: ``focal_pos(p) - focal_neg(p)``, p = sigmoid(logits).

    ``focal_pos = alpha (1 - p)^gamma (-log p)``, ``focal_neg = (1 - alpha) p^gamma (-log(1 - p))``: low
    when the query is confident in the class. Every Hungarian cost of the family (decoders, the
    anchor generator's class-agnostic score) uses this one.
    """
    prob = logits.to(compute_dtype()).sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


def solve_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """cost (Q, G) -> (rows, cols) int64 of the minimum-cost one-to-one assignment (min(Q, G) pairs)."""
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cost.device)
        return empty, empty.clone()
    # NaN / inf would make scipy raise; a huge finite value keeps such a pair last in preference.
    values = torch.nan_to_num(cost.detach().to(compute_dtype()), nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
    rows, cols = linear_sum_assignment(values)
    return torch.as_tensor(rows, dtype=torch.long, device=cost.device), torch.as_tensor(cols, dtype=torch.long, device=cost.device)


def area_weight(gt_norm: Tensor, strength: float) -> Tensor:
    """gt_norm (G, 4) normalised cxcywh -> (G,) ``A - (A - 1) sqrt(w h)``, in [1, A] (small boxes heavier)."""
    return strength - (strength - 1.0) * (gt_norm[:, 2] * gt_norm[:, 3]).clamp(min=0).sqrt()


@dataclass
class HungarianMatcher:
    """Focal class cost + L1 + GIoU, weights 2 / 5 / 2 (spec §5), scipy ``linear_sum_assignment``.

    ``__call__(predictions, targets, image_sizes, groups=None) -> Matches`` with ``weight = None``
    (the criterion fills the loss weights). ``groups`` (P,) int64 assigns every query to a group;
    None = one group.
    """

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0
    area_weight: float = 1.0

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target: Target, image_size: Tensor) -> Tensor:
        """logits (Q, C), boxes (Q, 4) xyxy px, image_size (2,) (h, w) -> cost (Q, G) float32."""
        cls_cost = focal_cost(logits[:, target.labels], self.alpha, self.gamma)  # (Q, G)
        gt = target.boxes.to(compute_dtype())
        pred_norm, gt_norm = normalize_boxes(boxes, image_size), normalize_boxes(gt, image_size)
        cost = (
            self.cls_weight * cls_cost
            + self.l1_weight * torch.cdist(pred_norm, gt_norm, p=1)
            - self.giou_weight * generalized_box_iou(boxes.to(compute_dtype()), gt)
        )
        if self.area_weight != 1.0:
            cost = cost * area_weight(gt_norm, self.area_weight)[None, :]
        return cost

    @torch.no_grad()
    def __call__(
        self, predictions: Predictions, targets: list[Target], image_sizes: Tensor, groups: Tensor | None = None
    ) -> Matches:
        pred_index, gt_index = [], []
        device = predictions.logits.device
        for b, target in enumerate(targets):
            target = target.to(device)
            valid = predictions.valid[b]
            group_ids = groups if groups is not None else torch.zeros_like(valid, dtype=torch.long)
            rows_b, cols_b = [], []
            for g in torch.unique(group_ids).tolist():
                queries = (valid & (group_ids == g)).nonzero(as_tuple=True)[0]  # (Q_g,)
                if len(target.boxes) == 0 or len(queries) == 0:
                    continue
                cost = self.cost_matrix(predictions.logits[b, queries], predictions.boxes[b, queries], target, image_sizes[b])
                rows, cols = solve_assignment(cost)
                rows_b.append(queries[rows])
                cols_b.append(cols)
            empty = torch.zeros(0, dtype=torch.long, device=device)
            pred_index.append(torch.cat(rows_b) if rows_b else empty)
            gt_index.append(torch.cat(cols_b) if cols_b else empty.clone())
        return Matches(pred_index, gt_index)
