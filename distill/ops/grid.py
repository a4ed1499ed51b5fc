"""The dense location grid: the point of each FPN cell and which cells lie inside each image.

Shared by dense heads (their predictions live on it), the distillation regions and the dense
pairer (which also builds it for the FPN maps of a sparse student).

Two conventions (:data:`GRIDS`), named by a detector's ``grid`` parameter and its ``DetectorSpec``:

- ``centre`` (default): cell (i, j) of a stride-s level has its point at the cell centre
  ((j + 0.5) s, (i + 0.5) s); a cell is valid when that centre lies inside the unpadded image.
- ``mmdet``: the point is the cell's corner (j s, i s), as mmdetection's anchor generator places
  anchor centres (``center_offset=0``), so GFL/ATSS anchors and DFL distances are measured from there;
  a cell is valid as mmdetection's valid flags say: j < ceil(W' / s) with W' the image's width padded
  to a multiple of 32 (the ``Pad(size_divisor=32)`` of its GFL configs), the same for rows. Since j is an
  integer this is j s < W', i.e. the point lies inside the 32-padded image. The official LD code runs
  on this grid (``reference: ld``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype


@dataclass(frozen=True)
class GridConvention:
    """Where a cell's point sits and which cells an image covers.

    offset: the point of cell (i, j) at stride s is ((j + offset) s, (i + offset) s).
    pad_to: a cell is valid when its point lies inside the image's (height, width), each rounded up
            to a multiple of ``pad_to`` (1: the image itself).
    """

    offset: float
    pad_to: int


GRIDS: dict[str, GridConvention] = {"centre": GridConvention(0.5, 1), "mmdet": GridConvention(0.0, 32)}


def grid_convention(name: str) -> GridConvention:
    if name not in GRIDS:
        raise ValueError(f"unknown grid convention {name!r} (known: {', '.join(GRIDS)})")
    return GRIDS[name]


def dense_points(
    level_sizes: tuple[tuple[int, int], ...], strides: tuple[int, ...], device: torch.device, grid: str = "centre"
) -> tuple[Tensor, Tensor]:
    """Location points of a pyramid, flattened level by level, row-major.

    Cell (i, j) of a stride-s level has its point at ((j + offset) * s, (i + offset) * s), offset 0.5
    for the ``centre`` grid, 0 for ``mmdet``.
    Returns points (N, 2) xy and strides (N,) in the compute dtype. Cached per (sizes, strides, device, dtype, grid):
    the returned tensors are shared and must not be modified in place. They are built outside
    inference mode even when first requested under it, so that training can reuse them later.
    """
    return _dense_points(level_sizes, strides, device, compute_dtype(), grid_convention(grid).offset)


@lru_cache(maxsize=32)
def _dense_points(
    level_sizes: tuple[tuple[int, int], ...], strides: tuple[int, ...], device: torch.device, dtype: torch.dtype, offset: float
) -> tuple[Tensor, Tensor]:
    points, point_strides = [], []
    with torch.inference_mode(False):
        for (h, w), s in zip(level_sizes, strides):
            ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
            point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        return torch.cat(points), torch.cat(point_strides)


def valid_locations(points: Tensor, image_sizes: Tensor | None, num_images: int = 1, grid: str = "centre") -> Tensor:
    """(B, N) bool: the location's point inside the unpadded image (``mmdet``: inside the image
    padded to a multiple of 32; see the module docstring).

    points: (N, 2) xy; image_sizes: (B, 2) (height, width), or None = every location of
    ``num_images`` images is valid (images fill the canvas).
    """
    if image_sizes is None:
        return torch.ones(num_images, points.shape[0], dtype=torch.bool, device=points.device)
    pad_to = grid_convention(grid).pad_to
    sizes = image_sizes.to(device=points.device)
    if pad_to > 1:
        sizes = torch.div(sizes + (pad_to - 1), pad_to, rounding_mode="floor") * pad_to
    sizes = sizes.to(dtype=points.dtype)
    inside_x = points[None, :, 0] < sizes[:, 1:2]
    inside_y = points[None, :, 1] < sizes[:, 0:1]
    return inside_x & inside_y
