"""Box conversions and box codings of the sparse (query-based) detectors.

Every box that crosses a module boundary is ``xyxy`` in input pixels. The codings below are local to
one update step:

* ``cxcywh``: centre and size, pixels (or image-normalised when divided by the image size);
* ``xyzr``:  the proposal block's log-scale coding (spec §3.2), x, y in pixels,
  ``z = log2(sqrt(w h))``, ``r = 0.5 log2(h / w)`` (a constant offset from the spec's P2 units, which
  cancels in every update);
* deltas ``(dx, dy, dw, dh)`` of Sparse R-CNN (spec §4, weights 2, 2, 1, 1);
* per-edge bins (``BoxBins``): distances from the proposal centre in units of a fraction of its
  width / height (spec §10.2, the distribution head).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert

from distill.ops.precision import compute_dtype
from distill.structures import BoxBins

__all__ = [
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "xyxy_to_xyzr",
    "xyzr_to_xyxy",
    "apply_deltas",
    "normalize_boxes",
    "bin_reference",
    "encode_bins",
]

# Largest log-scale change per step (Sparse R-CNN's log(1e5 / 16)): exp() never overflows.
MAX_LOG_SCALE = math.log(100000.0 / 16)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cx, cy, w, h (``torchvision.ops.box_convert``)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) xyxy (``torchvision.ops.box_convert``)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_xyzr(boxes: Tensor, min_size: float = 1e-3) -> Tensor:
    """(..., 4) xyxy -> (..., 4) x, y (centre, pixels), z = log2(sqrt(w h)), r = 0.5 log2(h / w)."""
    cx, cy, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
    w, h = w.clamp(min=min_size), h.clamp(min=min_size)
    return torch.stack([cx, cy, 0.5 * torch.log2(w * h), 0.5 * torch.log2(h / w)], dim=-1)


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """Inverse of :func:`xyxy_to_xyzr`: side ``s = 2^z``, w = s 2^-r, h = s 2^r."""
    x, y, z, r = xyzr.unbind(-1)
    scale = torch.exp2(z)
    w, h = scale * torch.exp2(-r), scale * torch.exp2(r)
    return cxcywh_to_xyxy(torch.stack([x, y, w, h], dim=-1))


def apply_deltas(boxes: Tensor, deltas: Tensor, weights: tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0)) -> Tensor:
    """Sparse R-CNN box update.

    boxes (..., 4) xyxy, deltas (..., 4) -> (..., 4) xyxy:
    ``cx' = cx + dx / wx * w``, ``cy' = cy + dy / wy * h``, ``w' = w exp(dw / ww)``, ``h' = h exp(dh / wh)``.
    """
    cx, cy, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
    dx, dy, dw, dh = (deltas / deltas.new_tensor(weights)).unbind(-1)
    dw, dh = dw.clamp(max=MAX_LOG_SCALE), dh.clamp(max=MAX_LOG_SCALE)
    return cxcywh_to_xyxy(torch.stack([cx + dx * w, cy + dy * h, w * torch.exp(dw), h * torch.exp(dh)], dim=-1))


def normalize_boxes(boxes: Tensor, image_size: Tensor) -> Tensor:
    """(..., 4) xyxy pixels and image_size (..., 2) (height, width) -> (..., 4) cxcywh in [0, 1] units."""
    h, w = image_size[..., 0].to(compute_dtype()), image_size[..., 1].to(compute_dtype())
    scale = torch.stack([w, h, w, h], dim=-1)
    return xyxy_to_cxcywh(boxes.to(compute_dtype())) / scale


def bin_reference(proposals: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Reference of the distribution head for proposals (B, P, 4) xyxy.

    Returns centers (B, P, 2) (the proposal centres) and spacing (B, P, 4): pixels per bin of the
    (left, top, right, bottom) edges, ``fraction`` of the proposal width (left / right) or height.
    With 17 bins and fraction 1/8 an edge reaches up to two proposal widths from the centre, and
    the proposal itself sits at bin 4.
    """
    cx, cy, w, h = xyxy_to_cxcywh(proposals).unbind(-1)
    w, h = w.clamp(min=1e-3) * fraction, h.clamp(min=1e-3) * fraction
    return torch.stack([cx, cy], dim=-1), torch.stack([w, h, w, h], dim=-1)


def encode_bins(bins: BoxBins, boxes: Tensor, eps: float = 0.01) -> Tensor:
    """boxes (B, P, 4) xyxy -> (B, P, 4) edge distances in bins, clamped to ``[0, K - 1 - eps]`` (DFL target)."""
    return bins.encode(boxes).clamp(min=0, max=bins.num_bins - 1 - eps)
