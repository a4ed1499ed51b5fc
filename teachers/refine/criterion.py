"""The refiner's loss: L1 on image-normalised (cx, cy, w, h) x 5 + GIoU x 2 at every step, summed.

Each step is normalised by the number of refined rows. With a one-to-one (Hungarian) matching that
is the GT count, as in the reference; with a dense assigner (ATSS, several locations per GT) it is
the positives count, so a GT with many positives does not weigh more than one with few. Under DDP
the count is averaged over ranks (:func:`refined_rows`, DETR's ``num_boxes``): with the gradients
averaged too, a row weighs the same whichever rank holds it, and two processes train as one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from distill.distributed import mean_over_ranks
from students.sparse.box_ops import normalize_boxes


@dataclass
class RefineCriterion:
    """``__call__(steps, gt, image_sizes) -> {"loss_l1", "loss_giou"}``.

    steps: per step (R, 4) refined xyxy px; gt: (R, 4) xyxy px; image_sizes: (R, 2) (h, w) of each
    row's image.
    """

    l1_weight: float = 5.0
    giou_weight: float = 2.0

    def __call__(self, steps: list[Tensor], gt: Tensor, image_sizes: Tensor, rows: float | None = None) -> dict[str, Tensor]:
        """``rows``: the normaliser (:func:`refined_rows` under DDP); None: this batch's row count."""
        rows = max(float(gt.shape[0]) if rows is None else rows, 1.0)
        gt = gt.to(steps[0].dtype)
        gt_norm = normalize_boxes(gt, image_sizes)
        l1 = sum((normalize_boxes(b, image_sizes) - gt_norm).abs().sum() for b in steps) / rows
        giou = sum(generalized_box_iou_loss(b, gt, reduction="sum") for b in steps) / rows
        return {"loss_l1": self.l1_weight * l1, "loss_giou": self.giou_weight * giou}


def refined_rows(count: int, device: torch.device | str) -> float:
    """The loss normaliser: this batch's refined rows averaged over DDP ranks, at least 1. A
    collective: every rank calls it at every step, whether it holds rows or not."""
    return max(float(mean_over_ranks(torch.tensor(float(count), device=device))), 1.0)


def zero_losses(anchor: Tensor) -> dict[str, Tensor]:
    """The loss terms of a batch without refined rows: zeros still connected to ``anchor``'s graph
    (the trainer's backward needs a graph; DDP needs every parameter to see one)."""
    zero = anchor * 0.0
    return {"loss_l1": zero, "loss_giou": zero.clone()}


__all__ = ["RefineCriterion", "refined_rows", "zero_losses"]
