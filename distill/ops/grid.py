"""The dense location grid: centres of FPN cells and which of them lie inside each image.

Shared by dense heads (their predictions live on it), the distillation regions and the dense
pairer (which also builds it for the FPN maps of a sparse student).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype


def dense_points(
    level_sizes: tuple[tuple[int, int], ...], strides: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Location centres of a pyramid, flattened level by level, row-major.

    Cell (i, j) of a stride-s level has centre ((j + 0.5) * s, (i + 0.5) * s).
    Returns points (N, 2) xy and strides (N,) in the compute dtype. Cached per (sizes, strides, device, dtype):
    the returned tensors are shared and must not be modified in place. They are built outside
    inference mode even when first requested under it, so that training can reuse them later.
    """
    return _dense_points(level_sizes, strides, device, compute_dtype())


@lru_cache(maxsize=32)
def _dense_points(
    level_sizes: tuple[tuple[int, int], ...], strides: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    points, point_strides = [], []
    with torch.inference_mode(False):
        for (h, w), s in zip(level_sizes, strides):
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
            point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        return torch.cat(points), torch.cat(point_strides)


def valid_locations(points: Tensor, image_sizes: Tensor | None, num_images: int = 1) -> Tensor:
    """(B, N) bool: location centre inside the unpadded image.

    points: (N, 2) xy; image_sizes: (B, 2) (height, width), or None = every location of
    ``num_images`` images is valid (images fill the canvas).
    """
    if image_sizes is None:
        return torch.ones(num_images, points.shape[0], dtype=torch.bool, device=points.device)
    sizes = image_sizes.to(device=points.device, dtype=points.dtype)
    inside_x = points[None, :, 0] < sizes[:, 1:2]
    inside_y = points[None, :, 1] < sizes[:, 0:1]
    return inside_x & inside_y
