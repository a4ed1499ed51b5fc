"""Positions of DAB-DETR: anchor coding, the image features' sine encoding, flattened memory.

- :func:`inverse_sigmoid`: the logit of an anchor coordinate, clamped away from 0 and 1.
- :func:`refine_anchors`: ``b' = sigmoid(inverse_sigmoid(b) + delta)``, DAB-DETR's box update.
- :func:`pixels_to_anchors` / :func:`anchors_to_pixels`: xyxy input pixels <-> image-normalised
  (cx, cy, w, h) anchors in (0, 1), each image by its own (h, w).
- :func:`flatten_memory`: multi-level maps -> one token sequence (B, N, D), its sine positional
  encoding (temperature 20, normalised to each image's valid extent, DAB-DETR's
  ``PositionEmbeddingSineHW``) and the padding mask.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype
from students.sparse.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from students.sparse.layers import sine_embedding

__all__ = ["inverse_sigmoid", "refine_anchors", "pixels_to_anchors", "anchors_to_pixels", "flatten_memory", "IMAGE_PE_TEMPERATURE"]

# DAB-DETR's temperature for the image (key) positional encoding: 20 sharpens the positional
# attention compared with 10000 (the paper's "temperature tuning"); the query boxes keep 10000.
IMAGE_PE_TEMPERATURE = 20.0
# Anchors within this distance of 0 or 1 are clamped before the logit (boxes outside the image,
# zero sides), so the logit stays finite: |logit| <= log((1 - eps) / eps) = 6.9.
ANCHOR_EPS = 1e-3


def inverse_sigmoid(x: Tensor, eps: float = ANCHOR_EPS) -> Tensor:
    """``log(x / (1 - x))`` of x clamped to [eps, 1 - eps]: the exact inverse of sigmoid inside that range."""
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


def refine_anchors(anchors: Tensor, delta: Tensor) -> Tensor:
    """anchors (..., 4) normalised cxcywh in (0, 1), delta (..., 4) -> ``sigmoid(inverse_sigmoid(anchors) + delta)``."""
    return torch.sigmoid(inverse_sigmoid(anchors) + delta)


def _scale(image_sizes: Tensor) -> Tensor:
    h, w = image_sizes[:, 0].to(compute_dtype()), image_sizes[:, 1].to(compute_dtype())
    return torch.stack([w, h, w, h], dim=-1)[:, None, :]  # (B, 1, 4)


def pixels_to_anchors(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes (B, Q, 4) xyxy px, image_sizes (B, 2) (h, w) -> (B, Q, 4) cxcywh / (W, H, W, H), clamped to [eps, 1 - eps]."""
    return (xyxy_to_cxcywh(boxes.to(compute_dtype())) / _scale(image_sizes)).clamp(ANCHOR_EPS, 1 - ANCHOR_EPS)


def anchors_to_pixels(anchors: Tensor, image_sizes: Tensor) -> Tensor:
    """Inverse of :func:`pixels_to_anchors` (without the clamp): (B, Q, 4) normalised cxcywh -> xyxy px."""
    return cxcywh_to_xyxy(anchors * _scale(image_sizes))


def flatten_memory(
    features: list[Tensor], strides: tuple[int, ...], image_sizes: Tensor, level_embed: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Maps (B, D, H_l, W_l) -> (memory (B, N, D), position (B, N, D), padding (B, N) bool, True = padding).

    A cell's position is its centre over the image's own size: ``x = (j + 0.5) s / w``,
    ``y = (i + 0.5) s / h`` (DETR normalises the same way, by the unpadded extent), encoded by
    :func:`~students.sparse.layers.sine_embedding` with D / 2 dims for x then D / 2 for y at
    temperature 20, plus the learned ``level_embed[l]`` (L, D) when given. Cells outside the image
    (``i >= ceil(h / s)`` or ``j >= ceil(w / s)``) are padding.
    """
    memory, position, padding = [], [], []
    sizes = image_sizes.to(compute_dtype())
    for level, (feat, stride) in enumerate(zip(features, strides)):
        batch, dim, height, width = feat.shape
        ys = (torch.arange(height, device=feat.device, dtype=sizes.dtype) + 0.5) * stride  # (H,)
        xs = (torch.arange(width, device=feat.device, dtype=sizes.dtype) + 0.5) * stride
        x = (xs[None, None, :] / sizes[:, 1, None, None]).expand(batch, height, width)
        y = (ys[None, :, None] / sizes[:, 0, None, None]).expand(batch, height, width)
        pos = sine_embedding(torch.stack([x, y], dim=-1), dim // 2, IMAGE_PE_TEMPERATURE).flatten(1, 2)  # (B, HW, D)
        if level_embed is not None:
            pos = pos + level_embed[level]
        rows = torch.ceil(sizes[:, 0] / stride)
        cols = torch.ceil(sizes[:, 1] / stride)
        inside = (torch.arange(height, device=feat.device)[None, :, None] < rows[:, None, None]) & (
            torch.arange(width, device=feat.device)[None, None, :] < cols[:, None, None]
        )
        memory.append(feat.flatten(2).transpose(1, 2))
        position.append(pos.to(feat.dtype))
        padding.append(~inside.flatten(1))
    return torch.cat(memory, 1), torch.cat(position, 1), torch.cat(padding, 1)
