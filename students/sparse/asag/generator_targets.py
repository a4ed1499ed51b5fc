"""Training of the anchor generator: probing windows, per-patch targets, Hungarian matching, loss.

- :func:`training_windows`: per probing level, every image gets at least ``min_patches`` windows:
  the generated ones, then GT windows (loss only), then uniformly random ones (loss only).
- :func:`patch_targets`: the GT of each patch (centre inside, size limit for probe windows),
  clipped to the patch, in patch-normalised cxcywh; P6 copies from flipped maps get flipped GT,
  flipped as cxcywh (h-flip: cx -> 1 - cx; v-flip: cy -> 1 - cy). The reference applies an xyxy
  formula to cxcywh there (spec 14.1); this is the corrected form.
- :func:`match_patches`: one Hungarian assignment per patch (scipy), vectorised argmin for
  patches holding a single GT.
- :func:`generator_loss`: class-agnostic quality focal loss with IoU soft labels and an ignore
  band, L1 and GIoU on matched anchors (spec 2.7).

Coordinates inside a patch are normalised to it: (0, 0) its top-left corner, (1, 1) its bottom-right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from distill.ops.precision import compute_dtype
from distill.structures import Target
from students.sparse.asag.generator_ops import rank_within_groups
from students.sparse.asag.generator_types import PatchPredictions
from students.sparse.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from students.sparse.matcher import focal_cost, solve_assignment


@dataclass(frozen=True)
class GeneratorLossWeights:
    """Weights of the anchor losses and the matching cost (spec 2.7, 5).

    cls / l1 / giou:    term weights (8 / 4 / 2).
    cost_class / cost_l1 / cost_giou: Hungarian cost weights (2 / 5 / 2).
    focal_alpha, focal_gamma: focal matching cost (0.25, 2).
    qfl_beta:           quality-focal exponent (2).
    area_weight:        A of the area weight a(g) = A - (A - 1) sqrt(wh) (P6: 1 + (A - 1) sqrt(wh));
                        1 disables it (the paper has none; the code uses 4).
    ignore_iou:         unmatched anchors with IoU >= this to some GT of their patch get no score loss.
    box_weighting:      scale box losses by Norm(sigma^0.4 IoU^0.6) (query weighting, spec 6).
    """

    cls: float = 8.0
    l1: float = 4.0
    giou: float = 2.0
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    qfl_beta: float = 2.0
    area_weight: float = 4.0
    ignore_iou: float = 0.5
    box_weighting: bool = True


# ---------------------------------------------------------------------- training windows
@torch.no_grad()
def training_windows(top_left: Tensor, image_index: Tensor, targets: list[Target], image_sizes: Tensor,
                     stride: int, size: int, min_patches: int, nms_iou: float,
                     gt_forcing: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Add loss-only windows so that each image has at least ``min_patches`` at this level.

    top_left (M, 2) int64 cells and image_index (M,): the generated windows.
    Returns (top_left (M', 2), image_index (M',), loss_only (M',) bool), generated first.

    GT windows come from GT boxes with both sides < stride * size / 2, de-duplicated per image by
    NMS (IoU ``nms_iou``) that prefers boxes near the others (score -sum of squared centre
    distances), placed at the box's top-left cell, moved inside the image, then shifted up / left
    by a random fraction of the slack that still keeps the box inside the window.
    ``gt_forcing``: the generated windows are dropped and every GT window takes their place
    (not loss-only); random windows still fill up to ``min_patches``.
    """
    device = image_index.device
    batch = image_sizes.shape[0]
    cells = torch.ceil(image_sizes.flip(-1).to(compute_dtype()) / stride).to(device)  # (B, 2) (w, h)
    boxes = torch.cat([t.boxes.to(device, compute_dtype()) for t in targets]) if targets else torch.zeros(0, 4, device=device)
    owner = torch.cat([torch.full((len(t.boxes),), i, dtype=torch.long, device=device) for i, t in enumerate(targets)]) \
        if targets else torch.zeros(0, dtype=torch.long, device=device)
    small = ((boxes[:, 2:] - boxes[:, :2]) < stride * size / 2).all(dim=1)
    boxes, owner = boxes[small], owner[small]
    centers = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    same = owner[:, None] == owner[None, :]
    density = -((centers[:, None] - centers[None]) ** 2).sum(-1).mul(same).sum(1)
    keep = batched_nms(boxes, density, owner, nms_iou)
    boxes, owner = boxes[keep], owner[keep]
    tl = torch.floor(boxes[:, :2] / stride)
    tl = torch.minimum(tl, cells[owner] - size)
    slack = (tl + size - boxes[:, 2:] / stride).clamp(min=0)
    gt_tl = torch.floor(tl - torch.rand_like(tl) * slack).clamp(min=0).long()

    if gt_forcing:
        top_left, image_index = gt_tl, owner
        gt_tl, owner = gt_tl[:0], owner[:0]
    need = (min_patches - torch.bincount(image_index, minlength=batch)).clamp(min=0)  # (B,)
    order, rank = rank_within_groups(owner, torch.rand(len(owner), device=device))
    take = order[rank < need[owner[order]]]
    need = need - torch.bincount(owner[take], minlength=batch)
    span = (cells - size).clamp(min=0) + 1  # (B, 2) admissible positions per axis
    rand_tl = torch.floor(torch.rand(batch, min_patches, 2, device=device) * span[:, None]).long()
    slot = torch.arange(min_patches, device=device)[None, :] < need[:, None]  # (B, min_patches)
    rand_img = torch.arange(batch, device=device)[:, None].expand(-1, min_patches)[slot]
    extra_tl = torch.cat((gt_tl[take], rand_tl[slot]))
    extra_img = torch.cat((owner[take], rand_img))
    loss_only = torch.cat((torch.zeros(len(image_index), dtype=torch.bool, device=device),
                           torch.ones(len(extra_img), dtype=torch.bool, device=device)))
    return torch.cat((top_left, extra_tl)), torch.cat((image_index, extra_img)), loss_only


# ---------------------------------------------------------------------- targets per patch
@torch.no_grad()
def patch_targets(patches: PatchPredictions, targets: list[Target]) -> tuple[Tensor, Tensor]:
    """GT of every patch, padded to the largest image's GT count G.

    Returns (boxes (P, G, 4) patch-normalised cxcywh, mask (P, G) bool). A GT belongs to a patch
    when its centre lies in the patch's region (half-open) and both sides are <= ``max_size``;
    it is clipped to the region; copies with ``hflip`` / ``vflip`` get cx -> 1 - cx / cy -> 1 - cy.
    """
    device = patches.regions.device
    num = max([len(t.boxes) for t in targets], default=0)
    gt = torch.zeros(len(targets), num, 4, device=device)
    present = torch.zeros(len(targets), num, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):  # B small copies, not a per-pixel loop
        gt[i, : len(t.boxes)] = t.boxes.to(device, compute_dtype())
        present[i, : len(t.boxes)] = True
    gt, present = gt[patches.image_index], present[patches.image_index]  # (P, G, 4), (P, G)
    region = patches.regions[:, None]  # (P, 1, 4)
    center = 0.5 * (gt[..., :2] + gt[..., 2:])
    inside = ((center >= region[..., :2]) & (center < region[..., 2:])).all(-1)
    fits = ((gt[..., 2:] - gt[..., :2]) <= patches.max_size[:, None, None]).all(-1)
    lo = torch.maximum(gt[..., :2], region[..., :2])
    hi = torch.minimum(gt[..., 2:], region[..., 2:])
    extent = region[..., 2:] - region[..., :2]
    norm = xyxy_to_cxcywh(torch.cat(((lo - region[..., :2]) / extent, (hi - region[..., :2]) / extent), -1))
    cx = torch.where(patches.hflip[:, None], 1 - norm[..., 0], norm[..., 0])
    cy = torch.where(patches.vflip[:, None], 1 - norm[..., 1], norm[..., 1])
    return torch.stack((cx, cy, norm[..., 2], norm[..., 3]), -1), present & inside & fits


def area_weights(boxes: Tensor, whole_image: Tensor, strength: float) -> Tensor:
    """(P, G) area weights of patch-normalised cxcywh boxes (P, G, 4); whole_image: (P,) bool."""
    root = (boxes[..., 2] * boxes[..., 3]).clamp(min=0).sqrt()
    small_first = strength - (strength - 1) * root
    large_first = 1 + (strength - 1) * root
    return torch.where(whole_image[:, None], large_first, small_first)


# ---------------------------------------------------------------------- matching
def pairwise_iou_giou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Batched pairwise IoU and GIoU of xyxy boxes a (P, N, 4) and b (P, G, 4) -> (P, N, G) each."""
    a, b = a[:, :, None], b[:, None]
    return elementwise_iou_giou(a, b)


def elementwise_iou_giou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and GIoU of broadcastable xyxy boxes (..., 4) -> (...) each."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    return iou, iou - (hull_area - union) / hull_area.clamp(min=1e-7)


@torch.no_grad()
def matching_cost(logits: Tensor, boxes: Tensor, gt: Tensor, weight: Tensor, w: GeneratorLossWeights) -> Tensor:
    """Hungarian cost (P, N, G) = [c_cls focal + c_l1 L1 + c_giou (-GIoU)] * a(g).

    logits (P, N); boxes (P, N, 4) and gt (P, G, 4) patch-normalised cxcywh; weight (P, G).
    """
    l1 = (boxes[:, :, None] - gt[:, None]).abs().sum(-1)
    _, giou = pairwise_iou_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt))
    cost = w.cost_class * focal_cost(logits, w.focal_alpha, w.focal_gamma)[..., None] + w.cost_l1 * l1 - w.cost_giou * giou
    return cost * weight[:, None]


@torch.no_grad()
def match_patches(cost: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Minimum-cost one-to-one assignment inside every patch.

    cost: (P, N, G); mask: (P, G) bool, the patch's real GT columns.
    Returns (patch (K,), pred (K,), gt (K,)) int64 on cost's device, K = sum over patches of
    min(N, #GT). Patches with one GT take the cheapest row (vectorised); the others run
    ``scipy.optimize.linear_sum_assignment`` on their real columns.
    """
    device = cost.device
    if not bool(mask.any()):
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    counts = mask.sum(1)
    single = torch.nonzero(counts == 1).flatten()
    single_gt = mask[single].to(compute_dtype()).argmax(1)
    single_pred = cost[single, :, :].gather(2, single_gt[:, None, None].expand(-1, cost.shape[1], 1)).squeeze(2).argmin(1)
    parts = [(single, single_pred, single_gt)]
    multi = torch.nonzero(counts > 1).flatten().tolist()
    if multi:
        cost_cpu, mask_cpu = cost.detach().cpu(), mask.cpu()
        rows_p, rows_n, rows_g = [], [], []
        for p in multi:
            cols = torch.nonzero(mask_cpu[p]).flatten()
            r, c = solve_assignment(cost_cpu[p][:, cols])  # NaN-safe: diverged predictions reach the loss guard
            rows_p += [p] * len(r)
            rows_n += r.tolist()
            rows_g += cols[c].tolist()
        parts.append(tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (rows_p, rows_n, rows_g)))
    return tuple(torch.cat([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]


# ---------------------------------------------------------------------- loss
def _norm(x: Tensor) -> Tensor:
    """Query-weighting squash: sigmoid(4.5 (x - 1/3)) / sigmoid(3), Norm(1) = 1."""
    return torch.sigmoid(4.5 * (x - 1 / 3)) * (1 + math.exp(-3.0))


def patch_group_loss(patches: PatchPredictions, targets: list[Target], w: GeneratorLossWeights) -> tuple[Tensor, Tensor, Tensor, int]:
    """Un-normalised (cls, l1, giou) sums of one group of patches and its number of matched pairs."""
    logits = patches.logits.to(compute_dtype())
    zero = logits.sum() * 0.0
    if logits.numel() == 0:
        return zero, zero, zero, 0
    gt, mask = patch_targets(patches, targets)
    weight = area_weights(gt, patches.whole_image, w.area_weight)
    boxes = patches.boxes.to(compute_dtype())
    patch, pred, col = match_patches(matching_cost(logits, boxes, gt, weight, w), mask)
    prob = logits.sigmoid()
    matched_box, matched_gt = boxes[patch, pred], gt[patch, col]
    iou, giou = elementwise_iou_giou(cxcywh_to_xyxy(matched_box), cxcywh_to_xyxy(matched_gt))
    iou = iou.detach()
    soft = torch.zeros_like(logits)
    soft[patch, pred] = iou
    cls_weight = torch.ones_like(logits)
    cls_weight[patch, pred] = weight[patch, col]
    with torch.no_grad():
        ious, _ = pairwise_iou_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt))  # (P, N, G)
        best = torch.where(mask[:, None], ious, torch.zeros_like(ious)).amax(-1) if gt.shape[1] else torch.zeros_like(prob)
        ignore = best >= w.ignore_iou
        ignore[patch, pred] = False
    bce = F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    cls = (bce * (soft - prob).abs().pow(w.qfl_beta) * cls_weight * (~ignore)).sum()
    box_w = weight[patch, col]
    if w.box_weighting:
        box_w = box_w * _norm(prob[patch, pred].detach() ** 0.4 * iou ** 0.6)
    l1 = ((matched_box - matched_gt).abs().sum(-1) * box_w).sum()
    giou_loss = ((1 - giou) * box_w).sum()
    return cls, l1, giou_loss, len(patch)


def generator_loss(fixed: PatchPredictions, probe: PatchPredictions, targets: list[Target], image_sizes: Tensor,
                   w: GeneratorLossWeights) -> dict[str, Tensor]:
    """Weighted anchor terms {"loss_anchor_cls", "loss_anchor_l1", "loss_anchor_giou"} (scalars).

    fixed / probe: the two patch groups of an ``AnchorOutput``; targets: B ground truths in input
    pixels; image_sizes (B, 2) is accepted for the detector contract (the patch regions already
    carry the geometry). Each group's sums are divided by max(its matched pairs, B), so a batch
    and the same batch repeated give the same values; the probe group is not otherwise rescaled.
    """
    batch = max(len(targets), 1)
    totals = [0.0, 0.0, 0.0]
    for group in (fixed, probe):
        *sums, pairs = patch_group_loss(group, targets, w)
        norm = float(max(pairs, batch))
        totals = [t + s / norm for t, s in zip(totals, sums)]
    return {"loss_anchor_cls": w.cls * totals[0], "loss_anchor_l1": w.l1 * totals[1],
            "loss_anchor_giou": w.giou * totals[2]}
