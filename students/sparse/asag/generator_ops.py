"""Tensor helpers of the adaptive sparse anchor generator: resampling, windows, decoding, ranks.

Pure functions, no parameters, every one batched (no Python loop over images or pixels). Boxes
are ``xyxy`` input pixels unless a name says ``cxcywh`` or ``norm`` (normalised to a patch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype
from students.sparse.box_ops import cxcywh_to_xyxy

# Logit given to anchors that must never be chosen (too small, centre on padding). Finite, so
# that sigmoid, BCE and sorting stay well defined; sigmoid(-30) ~ 1e-13.
SUPPRESSED_LOGIT = -30.0


def valid_cell_mask(image_sizes: Tensor, stride: int, height: int, width: int) -> Tensor:
    """(B, 1, height, width) float mask of the feature cells that overlap the image.

    image_sizes: (B, 2) (h, w) input pixels. A cell (i, j) is valid when i < ceil(h / stride)
    and j < ceil(w / stride): the cells the reference treats as inside the image.
    """
    sizes = torch.ceil(image_sizes.to(torch.float64) / stride).long()  # (B, 2) cells
    rows = torch.arange(height, device=image_sizes.device)
    cols = torch.arange(width, device=image_sizes.device)
    inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    return inside[:, None].to(compute_dtype())


def _bilinear_matrix(extent: Tensor, num_cells: int, out_size: int) -> Tensor:
    """(B, out_size, num_cells) rows of bilinear weights resampling [0, extent) onto out_size.

    extent: (B,) float, the image extent in feature cells (e.g. h / 32). Output sample i sits at
    source coordinate (i + 0.5) * extent / out_size - 0.5 (the half-pixel convention of
    ``F.interpolate(align_corners=False)``), clamped into the valid cells [0, ceil(extent) - 1],
    so padding is never read and the map aligns linearly with normalised image coordinates.
    """
    i = torch.arange(out_size, device=extent.device, dtype=compute_dtype())
    src = (i[None, :] + 0.5) * (extent[:, None] / out_size) - 0.5  # (B, S)
    last = (torch.ceil(extent) - 1).clamp(min=0)[:, None]
    src = torch.minimum(src.clamp(min=0.0), last)
    low = src.floor()
    frac = src - low
    low = low.long()
    high = torch.minimum(low + 1, last.long())
    weights = src.new_zeros(extent.shape[0], out_size, num_cells)
    weights.scatter_add_(2, low[..., None], (1.0 - frac)[..., None])
    weights.scatter_add_(2, high[..., None], frac[..., None])
    return weights


def resample_valid_region(features: Tensor, image_sizes: Tensor, stride: int, out_size: int) -> Tensor:
    """Bilinearly resize each image's valid region of a map to a fixed square grid.

    features:    (B, C, H, W) map of stride ``stride``.
    image_sizes: (B, 2) (h, w) input pixels.
    Returns (B, C, out_size, out_size): the region [0, h/stride) x [0, w/stride) resized
    ignoring aspect ratio, so grid cell (i, j) covers normalised image coordinates
    ((j + 0.5) / S, (i + 0.5) / S). Separable: two batched matrix products, exact per image.
    """
    sizes = image_sizes.to(compute_dtype()) / stride
    rows = _bilinear_matrix(sizes[:, 0], features.shape[2], out_size).to(features.dtype)  # (B, S, H)
    cols = _bilinear_matrix(sizes[:, 1], features.shape[3], out_size).to(features.dtype)  # (B, S, W)
    return torch.einsum("bsh,bchw,btw->bcst", rows, features, cols)


def gather_windows(features: Tensor, image_index: Tensor, top_left: Tensor, size: int) -> Tensor:
    """Crop square windows of feature cells, zeros outside the map.

    features:    (B, C, H, W).
    image_index: (M,) int64 image of each window.
    top_left:    (M, 2) int64 (x, y) of the window's first cell, >= 0.
    Returns (M, size * size, C): tokens in row-major order, channel last. One gather, exact
    (no interpolation), so a window reads the same cells whatever else is in the batch.
    """
    padded = torch.nn.functional.pad(features, (0, size, 0, size))  # never index past the end
    steps = torch.arange(size, device=features.device)
    rows = top_left[:, 1, None] + steps[None, :]  # (M, p)
    cols = top_left[:, 0, None] + steps[None, :]
    cells = padded.permute(0, 2, 3, 1)[image_index[:, None, None], rows[:, :, None], cols[:, None, :]]
    return cells.reshape(len(image_index), size * size, features.shape[1])  # (M, p*p, C)


def place_windows(centers: Tensor, image_sizes: Tensor, stride: int, size: int) -> Tensor:
    """Top-left cell of windows of ``size`` cells centred on points, kept inside the image.

    centers:     (M, 2) (x, y) input pixels.
    image_sizes: (M, 2) (h, w) of each point's image.
    Returns (M, 2) int64 (x, y): floor(center / stride - size / 2), moved left / up so the window
    ends inside ceil(w / stride) x ceil(h / stride) cells, then clamped at 0.
    """
    top_left = torch.floor(centers / stride - size / 2)
    cells = torch.ceil(image_sizes.flip(-1).to(centers.dtype) / stride)  # (M, 2) (w, h) cells
    top_left = torch.minimum(top_left, cells - size).clamp(min=0)
    return top_left.long()


def decode_patch_boxes(norm_cxcywh: Tensor, regions: Tensor) -> Tensor:
    """Patch-normalised cxcywh -> xyxy input pixels.

    norm_cxcywh: (P, N, 4) in [0, 1] relative to each patch.
    regions:     (P, 4) xyxy pixels covered by each patch.
    Returns (P, N, 4).
    """
    x0, y0, x1, y1 = regions[:, None].unbind(-1)  # (P, 1) each
    cx, cy, w, h = norm_cxcywh.unbind(-1)
    pw, ph = x1 - x0, y1 - y0
    return cxcywh_to_xyxy(torch.stack((x0 + cx * pw, y0 + cy * ph, w * pw, h * ph), dim=-1))


def rank_within_groups(groups: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Order rows by (group ascending, key descending) and rank them inside their group.

    groups: (A,) int64; keys: (A,) float.
    Returns (order (A,), rank (A,)): ``order`` lists the rows sorted; ``rank[k]`` is the position
    of row ``order[k]`` inside its group (0 = largest key). Ties keep the input order (stable).
    """
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    position = torch.arange(len(order), device=groups.device)
    is_start = torch.ones_like(sorted_groups, dtype=torch.bool)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), dim=0).values
    return order, position - start
