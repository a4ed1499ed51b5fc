"""Class and box heads shared by every sparse decoder (RoI stages and DAB-DETR layers).

- :func:`init_class_bias`: focal-loss prior (every class starts at ``prior_prob``).
- :func:`init_bins_bias`: the bins box head starts peaked at the identity box.
- :func:`bins_predictions`: per-edge bin logits on reference boxes -> ``BoxBins`` + decoded boxes,
  the LD-ready box head (``box_head="bins"``): K bins per edge measured from the reference box's
  centre in units of ``bin_fraction`` of its width / height (spec §10.2).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.ops.precision import compute_dtype
from distill.structures import BoxBins
from students.sparse.box_ops import bin_reference

__all__ = ["init_class_bias", "init_bins_bias", "bins_predictions", "BOX_HEADS"]

BOX_HEADS = ("delta", "bins")


def init_class_bias(linear: nn.Linear, prior_prob: float = 0.01) -> None:
    """Bias ``-log((1 - p) / p)``: every sigmoid score starts at ``prior_prob`` (RetinaNet)."""
    nn.init.constant_(linear.bias, -math.log((1 - prior_prob) / prior_prob))


def init_bins_bias(linear: nn.Linear, num_bins: int, bin_fraction: float) -> None:
    """Zero weights and a bias peaked at bin ``0.5 / bin_fraction`` on each edge: the identity box.

    An edge at half the reference side from its centre sits at ``0.5 / fraction`` bins (4 with 1/8),
    so the head starts by returning its input boxes, as the zero-initialised delta head does.
    """
    nn.init.zeros_(linear.weight)
    identity = 0.5 / bin_fraction
    bins = torch.arange(num_bins, dtype=compute_dtype())
    with torch.no_grad():
        linear.bias.copy_((-0.5 * (bins - identity) ** 2).repeat(4))


def bins_predictions(reg: Tensor, boxes: Tensor, bin_fraction: float) -> tuple[BoxBins, Tensor]:
    """reg (B, Q, 4 K) bin logits on reference boxes (B, Q, 4) xyxy px -> (BoxBins, decoded (B, Q, 4) xyxy px)."""
    batch, num = reg.shape[:2]
    centers, spacing = bin_reference(boxes, bin_fraction)
    bins = BoxBins(reg.view(batch, num, 4, -1), centers, spacing)
    return bins, bins.decode()
