"""Typed containers shared by data, detectors, losses and the engine.

Coordinates are always ``xyxy`` in pixels of the *network input* (after resize, before padding)
unless a name says otherwise. Dense per-location tensors are flattened level by level (P3 first),
row-major inside a level, so index ``n`` means the same location for student, teacher, assigner and
region masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


def _to(obj, device: torch.device | str):
    """Return a copy of a dataclass with every tensor field (and lists of tensors) moved."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            changes[f.name] = [v.to(device) for v in value]
        elif isinstance(value, list) and value and hasattr(value[0], "to"):
            changes[f.name] = [v.to(device) for v in value]
    return replace(obj, **changes)


@dataclass
class Target:
    """Ground truth of one image.

    boxes:  (G, 4) float32 xyxy, input pixels.
    labels: (G,) int64 contiguous class indices in [0, C).
    """

    boxes: Tensor
    labels: Tensor

    @staticmethod
    def empty() -> "Target":
        return Target(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))

    def to(self, device) -> "Target":
        return _to(self, device)


@dataclass
class Batch:
    """A collated batch.

    images:      (B, 3, H, W) float32, normalized, zero-padded to a multiple of the size divisor.
    targets:     B ground truths in input pixels.
    image_ids:   B COCO image ids.
    image_sizes: (B, 2) int64 (height, width) of each resized image inside the padding.
    scales:      (B,) float32; input pixels = original pixels * scale.
    flipped:     (B,) bool; True when the image was horizontally flipped.
    """

    images: Tensor
    targets: list[Target]
    image_ids: list[int]
    image_sizes: Tensor
    scales: Tensor
    flipped: Tensor

    def to(self, device) -> "Batch":
        return _to(self, device)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DenseOutputs:
    """What a dense (GFL-style) head returns for a batch.

    cls_logits: per level (B, C, H_l, W_l) joint class-quality logits (sigmoid).
    reg_logits: per level (B, 4 * (reg_max + 1), H_l, W_l) bin logits, edges ordered
                (left, top, right, bottom), bins contiguous per edge.
    points:     (N, 2) xy location centres in input pixels, N = sum_l H_l * W_l.
    strides:    (N,) float32 stride of each location.
    level_sizes: per level (H_l, W_l).
    reg_max:    bins per edge minus one (17 bins for reg_max 16).
    """

    cls_logits: list[Tensor]
    reg_logits: list[Tensor]
    points: Tensor
    strides: Tensor
    level_sizes: list[tuple[int, int]]
    reg_max: int

    @property
    def num_classes(self) -> int:
        return self.cls_logits[0].shape[1]

    def flat_cls(self) -> Tensor:
        """(B, N, C) class logits, levels concatenated."""
        return torch.cat([x.flatten(2).transpose(1, 2) for x in self.cls_logits], dim=1)

    def flat_reg(self) -> Tensor:
        """(B, N, 4, reg_max + 1) per-edge bin logits, levels concatenated."""
        bins = self.reg_max + 1
        flat = [x.flatten(2).transpose(1, 2) for x in self.reg_logits]  # (B, HW, 4*bins)
        out = torch.cat(flat, dim=1)
        return out.reshape(out.shape[0], out.shape[1], 4, bins)


@dataclass
class Assignment:
    """The label assignment a detector's loss used, exposed so distillation can reuse it.

    labels:         (B, N) int64, class index at positives, C (= background) elsewhere.
    pos_mask:       (B, N) bool, the student's positive locations (the LD "main region").
    matched_boxes:  (B, N, 4) GT box of each positive in input pixels (zeros elsewhere).
    valid_mask:     (B, N) bool, location lies inside the image (not padding).
    quality_weight: (B, N) detached max class sigmoid score at positives, 0 elsewhere; the
                    weight GIoU, DFL and Main LD use.
    pos_thresholds: B tensors (G_i,), the ATSS IoU threshold alpha_pos of each GT (used by VLR).
    """

    labels: Tensor
    pos_mask: Tensor
    matched_boxes: Tensor
    valid_mask: Tensor
    quality_weight: Tensor
    pos_thresholds: list[Tensor] = field(default_factory=list)

    def to(self, device) -> "Assignment":
        return _to(self, device)


@dataclass
class Detections:
    """Post-processed detections of one image in input pixels.

    boxes: (K, 4) xyxy; scores: (K,); labels: (K,) int64.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def to(self, device) -> "Detections":
        return _to(self, device)
