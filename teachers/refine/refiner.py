"""The box refiner of RefineBox: a light FPN of its own over a frozen detector's maps, RoIAlign
around each box, three GroupNorm bottlenecks, a pooled MLP, and a 4-delta box update.

One set of weights is applied ``steps`` times: step s reads RoI features around the boxes of step
s - 1 and moves them in the logit space of image-normalised (cx, cy, w, h)::

    b_s = sigmoid(inverse_sigmoid(b_{s-1}) + delta(RoIAlign(P, b_{s-1})))

Gradients flow across the steps (the boxes are not detached in between), as in the reference.
Class scores never pass through here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from students.sparse.dab_detr.embedding import anchors_to_pixels, pixels_to_anchors, refine_anchors
from students.sparse.layers import PyramidFPN, mlp_head, roi_features

__all__ = ["Bottleneck", "BoxRefiner", "REFINER_DEFAULTS"]

# The reference's settings (spec §13): 64 channels, bottlenecks 64 -> 64 -> 64 (hidden 64), 3 of them,
# 2 MLP layers, 7x7 RoIs, 3 steps. ``hidden`` is the bottlenecks' inner width: their 3x3 convs are
# the refiner's cost (9 * hidden^2 per RoI cell per block per step), so a slim detector, for which
# the reference's refiner is a large share of inference, can take ResNet's usual channels / 4.
# None: the same as ``channels`` (the reference; checkpoints written before the setting existed).
REFINER_DEFAULTS = {"channels": 64, "hidden": None, "blocks": 3, "mlp_layers": 2, "roi_size": 7, "canonical_size": 224.0}
GN_GROUPS = 32  # detectron2's GroupNorm default


class Bottleneck(nn.Module):
    """ResNet bottleneck at stride 1: 1x1 -> 3x3 -> 1x1 convs, GroupNorm after each, identity shortcut.

    ``forward(x (N, C, S, S)) -> (N, C, S, S)``.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        norm = lambda c: nn.GroupNorm(math.gcd(GN_GROUPS, c), c)  # noqa: E731
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), norm(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), norm(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.body(x))


class BoxRefiner(nn.Module):
    """Refines boxes on the maps of a frozen detector.

    in_channels / strides: the detector's feature maps (``features()``), finest first; channels: the
    refiner's FPN and RoI width; hidden: the bottlenecks' inner width (None: ``channels``).
    ``maps(features) -> list[(B, channels, H_l, W_l)]``: the refiner's own FPN (trainable).
    ``forward(maps, boxes (B, K, 4) xyxy px, image_sizes (B, 2), steps) -> steps x (B, K, 4)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        channels: int = 64,
        hidden: int | None = None,
        blocks: int = 3,
        mlp_layers: int = 2,
        roi_size: int = 7,
        canonical_size: float = 224.0,
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.roi_size = roi_size
        self.canonical_size = float(canonical_size)
        self.fpn = PyramidFPN(list(in_channels), channels)
        self.blocks = nn.Sequential(*(Bottleneck(channels, channels if hidden is None else hidden) for _ in range(blocks)))
        self.mlp = mlp_head(channels, mlp_layers, bias=False)
        self.delta = nn.Linear(channels, 4)
        # Zero deltas: an untrained refiner returns its input boxes (up to the anchor clamp), so
        # training starts from the detector's own accuracy, never below it.
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    def maps(self, features: list[Tensor]) -> list[Tensor]:
        return self.fpn(features)

    def step(self, maps: list[Tensor], boxes: Tensor, image_sizes: Tensor) -> Tensor:
        """One update: boxes (B, K, 4) xyxy px -> (B, K, 4) xyxy px."""
        batch, num = boxes.shape[:2]
        rois = roi_features(maps, self.strides, boxes, self.roi_size, self.canonical_size)  # (B*K, C, S, S)
        pooled = self.blocks(rois).mean(dim=(-2, -1))  # (B*K, C)
        delta = self.delta(self.mlp(pooled)).reshape(batch, num, 4)
        anchors = pixels_to_anchors(boxes, image_sizes)
        return anchors_to_pixels(refine_anchors(anchors, delta.to(anchors.dtype)), image_sizes)

    def forward(self, maps: list[Tensor], boxes: Tensor, image_sizes: Tensor, steps: int) -> list[Tensor]:
        out = []
        for _ in range(steps):
            boxes = self.step(maps, boxes, image_sizes)
            out.append(boxes)
        return out


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ += ["parameter_count"]
