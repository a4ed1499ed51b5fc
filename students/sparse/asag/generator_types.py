"""Data types of the anchor generator and the final per-image assembly of its anchors.

- :class:`PatchPredictions`: one MLP's raw per-patch predictions (with gradients) and the patch
  geometry the loss needs.
- :class:`AnchorOutput`: what ``AnchorGenerator.forward`` returns.
- :class:`Candidates`: flat anchors of one stage, and :func:`assemble_anchors`, which turns the
  kept candidates of every stage into padded per-image tensors with a valid mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from students.sparse.asag.generator_ops import SUPPRESSED_LOGIT, rank_within_groups

# A fixed-level candidate that is not kept carries source + UNKEPT: it may only fill up min_anchors.
UNKEPT = 10


@dataclass
class PatchPredictions:
    """Raw per-patch predictions of one MLP, with gradients (what the loss matches).

    logits:      (P, N) position-score logits.
    boxes:       (P, N, 4) patch-normalised cxcywh in [0, 1] (after the sigmoid).
    regions:     (P, 4) xyxy input pixels each patch covers (the image for P6 copies).
    image_index: (P,) int64.
    hflip/vflip: (P,) bool; a P6 copy predicted from a flipped map (targets are flipped alike).
    whole_image: (P,) bool; P6 patches (area weight emphasises large objects there).
    max_size:    (P,) float; GT with a side above this (pixels) is no target (inf: no limit).
    level:       (P,) int64 FPN level the patch was cut from: 5 quadrant, 6 P6, 4 / 3 probe windows.
    """

    logits: Tensor
    boxes: Tensor
    regions: Tensor
    image_index: Tensor
    hflip: Tensor
    vflip: Tensor
    whole_image: Tensor
    max_size: Tensor
    level: Tensor


@dataclass
class AnchorOutput:
    """What :class:`AnchorGenerator` returns. Shapes in the module docstring; ``probe_windows``
    counts the windows each probing level ran (generated and, in training, loss-only ones)."""

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    source: Tensor
    fixed: PatchPredictions
    probe: PatchPredictions
    probe_windows: list[int]


@dataclass
class Candidates:
    """Flat anchors of a stage: boxes (A, 4) xyxy px, logits (A,), image (A,), source (A,)."""

    boxes: Tensor
    logits: Tensor
    image: Tensor
    source: Tensor

    def take(self, mask: Tensor) -> "Candidates":
        return Candidates(self.boxes[mask], self.logits[mask], self.image[mask], self.source[mask])


def mark_kept(cand: Candidates, keep: Tensor) -> Candidates:
    """All fixed-level candidates, the unkept ones flagged by source + UNKEPT (fillers for min_anchors)."""
    return Candidates(cand.boxes, cand.logits, cand.image, torch.where(keep, cand.source, cand.source + UNKEPT))


def assemble_anchors(parts: list[Candidates], image_sizes: Tensor, min_anchors: int,
                     max_anchors: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kept anchors of every stage -> padded (boxes, scores, valid, source) per image.

    The first part carries every fixed-level candidate with a ``kept`` flag (its source is
    offset by UNKEPT when not kept): unkept fixed anchors only fill images below ``min_anchors``.
    Each image keeps clamp(#kept, min_anchors, max_anchors) anchors, kept ones first, then by
    score; columns beyond that are padding (full-image box, SUPPRESSED_LOGIT, valid False, -1).
    """
    cand = Candidates(*(torch.cat([getattr(c, f) for c in parts]) for f in ("boxes", "logits", "image", "source")))
    kept = cand.source < UNKEPT
    source = cand.source % UNKEPT
    batch = image_sizes.shape[0]
    count = torch.bincount(cand.image[kept], minlength=batch)
    wanted = count.clamp(min=min_anchors, max=max_anchors)
    key = kept.to(cand.logits.dtype) * 2 + cand.logits.sigmoid()
    order, rank = rank_within_groups(cand.image, key)
    take = rank < wanted[cand.image[order]]
    rows, cols = cand.image[order][take], rank[take]
    width = int(wanted.max()) if batch else 0
    h, w = image_sizes[:, 0].to(cand.boxes.dtype), image_sizes[:, 1].to(cand.boxes.dtype)
    zero = torch.zeros_like(w)
    boxes = torch.stack((zero, zero, w, h), -1)[:, None].repeat(1, width, 1)  # padding: whole image
    scores = cand.logits.new_full((batch, width), SUPPRESSED_LOGIT)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=cand.boxes.device)
    src = torch.full((batch, width), -1, dtype=torch.long, device=cand.boxes.device)
    boxes[rows, cols] = cand.boxes[order][take]
    scores[rows, cols] = cand.logits[order][take]
    valid[rows, cols] = True
    src[rows, cols] = source[order][take]
    return boxes, scores, valid, src


def cat_patches(parts: list[PatchPredictions]) -> PatchPredictions:
    names = PatchPredictions.__dataclass_fields__
    return PatchPredictions(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})


def empty_patches(like: Tensor, anchors: int) -> PatchPredictions:
    """A probe group with no window (early stop or probe_levels = 0)."""
    f = like.new_zeros
    b = torch.zeros(0, dtype=torch.bool, device=like.device)
    return PatchPredictions(f(0, anchors), f(0, anchors, 4), f(0, 4), torch.zeros(0, dtype=torch.long, device=like.device),
                            b, b, b, f(0), torch.zeros(0, dtype=torch.long, device=like.device))
