"""Set criterion of the sparse detectors: Hungarian matching + focal / Query-Weighted losses (spec §5-§7).

Every head (main, parallel auxiliary heads, earlier stages, the proposal block) is matched on its
own and gets the full loss. Terms, per head, each divided by :func:`num_boxes`:

* classification, summed over valid queries x classes:
  - ``query_weighting=False``: sigmoid focal loss (alpha 0.25, gamma 2) against one-hot targets at
    the matched queries (DETR / Sparse R-CNN);
  - ``query_weighting=True`` (ASAG, spec §6): matched query, GT class:
    ``[w_pos BCE(z, 1) + w_neg BCE(z, 0)] a(g)``; every other entry ``BCE(z, 0) sigmoid(z)^2``;
* L1 of image-normalised cxcywh boxes and ``1 - GIoU``, each matched query weighted by ``w_pos a(g)``
  (QW) or ``a(g)``;
* DFL (heads with ``bins``): GFL's distribution focal loss of the GT edges in the proposal's bins,
  mean over the 4 edges, same per-query weight.

Query Weighting changes the losses only, never the matching cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from distill.distributed import mean_over_ranks
from distill.ops.boxes import aligned_iou
from distill.ops.precision import compute_dtype
from distill.structures import BoxBins, Matches, Predictions, Target
from students.common.losses import distribution_focal_loss
from students.sparse.box_ops import encode_bins, normalize_boxes
from students.sparse.matcher import HungarianMatcher, area_weight

__all__ = ["SetCriterion", "num_boxes", "query_weights", "qw_norm"]

_NORM_SCALE = 1.0 / (1.0 / (1.0 + math.exp(-3.0)))  # 1 / sigmoid(3)
_NEG_OFFSET = (1.0 / (1.0 + math.exp(1.5))) * _NORM_SCALE  # sigmoid(-1.5) / sigmoid(3)


def num_boxes(targets: list[Target], device: torch.device | str) -> Tensor:
    """Loss normaliser: GT boxes in the batch, averaged over DDP ranks when initialised, at least 1.

    () float32. All ranks then divide by the same number, so a box weighs the same whichever
    rank holds it (DETR's ``num_boxes``).
    """
    total = torch.tensor(float(sum(len(t.boxes) for t in targets)), device=device)
    return torch.as_tensor(mean_over_ranks(total), device=device).clamp(min=1.0)


def qw_norm(x: Tensor) -> Tensor:
    """``sigmoid(4.5 (x - 1/3)) / sigmoid(3)``: 0 -> 0.1915, 1/3 -> 0.525, 1 -> 1."""
    return torch.sigmoid(4.5 * (x - 1.0 / 3.0)) * _NORM_SCALE


def query_weights(scores: Tensor, ious: Tensor, gamma1: float = 0.4, gamma2: float = 0.6) -> tuple[Tensor, Tensor]:
    """Query Weighting of matched queries (spec §6, ASAG eq. 1-3).

    scores (M,) sigmoid score at the GT class, ious (M,) IoU with the GT, both detached.
    Returns (w_pos, w_neg), each (M,): ``w_pos = Norm(s^g1 u^g2)`` in [0.19, 1] and
    ``w_neg = Norm(s^g1 P_neg(u^g2)) - sigmoid(-1.5) / sigmoid(3)`` in [0, 0.81], with
    ``P_neg(x) = 1`` below 0.5 and ``(1 - x^2) / 0.75`` above (0 at x = 1).
    """
    s = scores.detach().to(compute_dtype()).clamp(min=0).pow(gamma1)
    u = ious.detach().to(compute_dtype()).clamp(min=0).pow(gamma2)
    p_neg = torch.where(u < 0.5, torch.ones_like(u), (1 - u * u) / 0.75)
    return qw_norm(s * u), qw_norm(s * p_neg) - _NEG_OFFSET


@dataclass
class SetCriterion:
    """Losses of one or several heads (see the module docstring); weights 2 / 5 / 2, DFL 0.25."""

    matcher: HungarianMatcher = field(default_factory=HungarianMatcher)
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dfl_weight: float = 0.25
    query_weighting: bool = True
    gamma1: float = 0.4
    gamma2: float = 0.6
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    area_weight: float = 1.0

    def __call__(
        self,
        predictions: Predictions,
        targets: list[Target],
        image_sizes: Tensor,
        groups: Tensor | None = None,
        aux_names: list[str] | None = None,
    ) -> tuple[dict[str, Tensor], Matches]:
        """Losses of the main head (``loss_cls``, ``loss_l1``, ``loss_giou`` [, ``loss_dfl``]) and of every
        ``predictions.aux[i]`` (same keys + ``_{aux_names[i]}``, default ``_aux{i}``), weighted; and the
        main head's matches (``weight``: the per-query box weight the losses used), with each aux
        head's own matches in ``matches.aux`` (``Predictions.aux`` order).
        """
        if len(targets) != predictions.num_images:
            raise ValueError(f"{len(targets)} targets for a batch of {predictions.num_images} images")
        targets = [t.to(predictions.logits.device) for t in targets]
        num_groups = 1 if groups is None else int(torch.unique(groups).numel())
        normalizer = num_boxes(targets, predictions.logits.device) * num_groups
        losses, matches = self.head_loss(predictions, targets, image_sizes, normalizer, groups)
        names = aux_names or [f"aux{i}" for i in range(len(predictions.aux))]
        for name, aux in zip(names, predictions.aux):
            aux_losses, aux_matches = self.head_loss(aux, targets, image_sizes, normalizer, groups)
            losses.update({f"{k}_{name}": v for k, v in aux_losses.items()})
            matches.aux.append(aux_matches)
        return losses, matches

    def head_loss(
        self, pred: Predictions, targets: list[Target], image_sizes: Tensor, normalizer: Tensor, groups: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Matches]:
        """Match one head and compute its weighted terms (no suffix)."""
        matches = self.matcher(pred, targets, image_sizes, groups)
        image = torch.cat([torch.full_like(i, b) for b, i in enumerate(matches.pred_index)])  # (M,)
        query = torch.cat(matches.pred_index)
        gt_boxes = torch.cat([t.boxes.to(compute_dtype())[g] for t, g in zip(targets, matches.gt_index)])  # (M, 4)
        gt_labels = torch.cat([t.labels[g] for t, g in zip(targets, matches.gt_index)])
        sizes = image_sizes.to(pred.boxes.device)[image]  # (M, 2)
        boxes = pred.boxes[image, query].to(compute_dtype())  # (M, 4)
        gt_norm = normalize_boxes(gt_boxes, sizes)
        a = area_weight(gt_norm, self.area_weight) if self.area_weight != 1.0 else torch.ones_like(gt_norm[:, 0])

        cls, box_weight = self._classification(pred, image, query, gt_labels, aligned_iou(boxes.detach(), gt_boxes), a)
        losses = {"loss_cls": self.cls_weight * cls / normalizer}
        if len(query) == 0:
            zero = pred.boxes.sum() * 0  # keeps the box branch in the graph
            losses.update(loss_l1=zero, loss_giou=zero.clone())
            if pred.bins is not None:
                losses["loss_dfl"] = pred.bins.logits.sum() * 0
        else:
            l1 = (F.l1_loss(normalize_boxes(boxes, sizes), gt_norm, reduction="none").sum(-1) * box_weight).sum()
            giou = (generalized_box_iou_loss(boxes, gt_boxes, reduction="none") * box_weight).sum()
            losses.update(loss_l1=self.l1_weight * l1 / normalizer, loss_giou=self.giou_weight * giou / normalizer)
            if pred.bins is not None:
                losses["loss_dfl"] = self.dfl_weight * (self._dfl(pred.bins, image, query, gt_boxes) * box_weight).sum() / normalizer
        weights = list(box_weight.detach().split([len(i) for i in matches.pred_index]))
        return losses, Matches(matches.pred_index, matches.gt_index, weights)

    def _classification(
        self, pred: Predictions, image: Tensor, query: Tensor, labels: Tensor, ious: Tensor, a: Tensor
    ) -> tuple[Tensor, Tensor]:
        """() summed classification loss and (M,) per-match box weight."""
        logits = pred.logits.to(compute_dtype())  # (B, P, C)
        valid = pred.valid[..., None].to(compute_dtype())
        if not self.query_weighting:
            target = torch.zeros_like(logits)
            target[image, query, labels] = 1.0
            focal = sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction="none")
            return (focal * valid).sum(), a
        negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        negative = negative * logits.sigmoid().pow(2) * valid  # (B, P, C)
        z = logits[image, query, labels]  # (M,)
        w_pos, w_neg = query_weights(z.sigmoid(), ious, self.gamma1, self.gamma2)
        positive = (w_pos * F.softplus(-z) + w_neg * F.softplus(z)) * a  # BCE(z, 1) = softplus(-z)
        total = negative.sum() - negative[image, query, labels].sum() + positive.sum()
        return total, w_pos * a

    def _dfl(self, bins: BoxBins, image: Tensor, query: Tensor, gt_boxes: Tensor) -> Tensor:
        """(M,) DFL of the GT edges in each matched query's bins, mean over the 4 edges."""
        logits, centers, spacing = bins.rows(image, query)  # (M, 4, K), (M, 2), (M, 4)
        target = encode_bins(BoxBins(logits[None], centers[None], spacing[None]), gt_boxes[None])[0]  # (M, 4)
        return distribution_focal_loss(logits.reshape(-1, bins.num_bins), target.reshape(-1)).view(-1, 4).mean(-1)
