"""Detection transforms: resize (longer side), horizontal flip, normalize; boxes follow exactly.

Padding to a stride multiple happens later, in :func:`distill.data.loader.collate`, so every
sample keeps its own unpadded size (``Batch.image_sizes``).

Coordinate conventions (see ``distill.structures``): boxes are ``xyxy`` floats with a pixel
``(r, c)`` covering ``[c, c + 1) x [r, r + 1)``, so a box spanning a whole image of width ``w`` is
``[0, 0, w, h]`` and a horizontal flip maps ``x -> w - x``.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def derive_seed(*values: int) -> int:
    """A non-negative 63-bit integer that is a pure function of ``values``.

    Used instead of global RNG state so a draw (a flip, an epoch's order, a scene) can be
    recomputed from its coordinates alone, e.g. after resuming a run.
    """
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def flip_draw(seed: int, epoch: int, index: int) -> float:
    """Uniform number in ``[0, 1)`` for item ``index`` of ``epoch``; pure in its arguments."""
    return (derive_seed(seed, epoch, index) >> 10) * 2.0**-53


def resized_shape(height: int, width: int, size: int) -> tuple[float, int, int]:
    """Scale and ``(height, width)`` after resizing so that the longer side equals ``size``."""
    scale = size / max(height, width)
    return scale, max(1, round(height * scale)), max(1, round(width * scale))


def scale_boxes(boxes: Tensor, scale: float) -> Tensor:
    """(G, 4) xyxy boxes multiplied by ``scale`` (original pixels -> input pixels)."""
    return boxes * scale


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """(G, 4) xyxy boxes mirrored in an image of ``width``: ``x1' = w - x2``, ``x2' = w - x1``.

    The flip is its own inverse, so the same call undoes it.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def boxes_to_original(boxes: Tensor, scale: float, flipped: bool, width: float) -> Tensor:
    """Map (K, 4) xyxy boxes from input pixels back to original image pixels.

    ``width`` is the *resized* (unpadded) image width, i.e. ``Batch.image_sizes[b, 1]``: the
    flip happened after the resize, so it is undone first, then the scale.
    """
    if flipped:
        boxes = hflip_boxes(boxes, width)
    return boxes / scale


class DetectionTransform:
    """Resize (longer side = ``size``, aspect kept), optional horizontal flip, normalize.

    Args:
        size: length of the longer image side after resizing, in pixels.
        hflip_prob: probability that the dataset flips an item (the dataset draws, see
            :meth:`should_flip`; ``__call__`` only applies the decision it is given).
        mean, std: per-channel RGB normalization of ``[0, 1]`` pixel values.
    """

    def __init__(
        self,
        size: int,
        hflip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if int(size) != size or size < 1:
            raise ConfigError(f"transform size must be a positive integer, got {size!r}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ConfigError(f"transform hflip_prob must be in [0, 1], got {hflip_prob!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"transform mean/std need 3 values with std > 0, got {mean!r}, {std!r}")
        self.size = int(size)
        self.hflip_prob = float(hflip_prob)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def should_flip(self, seed: int, epoch: int, index: int) -> bool:
        """Whether item ``index`` is flipped in ``epoch``: a pure function of its arguments."""
        return self.hflip_prob > 0.0 and flip_draw(seed, epoch, index) < self.hflip_prob

    def __call__(self, image: Tensor, boxes: Tensor, flip: bool) -> tuple[Tensor, Tensor, float]:
        """Transform one image and its boxes.

        Args:
            image: (3, H, W) uint8 RGB.
            boxes: (G, 4) float xyxy in original pixels.
            flip: apply the horizontal flip.

        Returns:
            image (3, h, w) float32 normalized, boxes (G, 4) xyxy in input pixels clamped to
            the resized image, and ``scale`` with input pixels = original pixels * scale.
        """
        _, height, width = image.shape
        scale, new_h, new_w = resized_shape(height, width, self.size)
        pixels = image.unsqueeze(0).float()
        if (new_h, new_w) != (height, width):
            # antialias matters when shrinking large photos; it is a no-op when enlarging.
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear",
                                   align_corners=False, antialias=True)
        pixels = pixels[0]
        boxes = scale_boxes(boxes.float(), scale)
        # Rounding the resized size can move the image border by < 0.5 px: keep boxes inside.
        boxes = torch.stack([boxes[:, 0].clamp(0, new_w), boxes[:, 1].clamp(0, new_h),
                             boxes[:, 2].clamp(0, new_w), boxes[:, 3].clamp(0, new_h)], dim=-1)
        if flip:
            pixels = pixels.flip(-1)
            boxes = hflip_boxes(boxes, new_w)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        pixels = (pixels / 255.0 - mean) / std
        return pixels.contiguous(), boxes, scale

    def config(self) -> dict:
        """Plain description of the transform (for cache keys and logs)."""
        return {"size": self.size, "hflip_prob": self.hflip_prob,
                "mean": list(self.mean), "std": list(self.std)}

    def __repr__(self) -> str:
        return (f"DetectionTransform(size={self.size}, hflip_prob={self.hflip_prob}, "
                f"mean={self.mean}, std={self.std})")
