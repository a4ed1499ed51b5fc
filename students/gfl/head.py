"""GFL (Generalized Focal Loss V1) head and the location grid it predicts on."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.ops.grid import dense_points, valid_locations
from distill.ops.precision import compute_dtype
from distill.structures import BoxBins, DenseOutputs, HeadStages

__all__ = ["GFLHead", "Scale", "gn_groups", "dense_points", "dense_outputs", "valid_locations"]


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups for a tower of width ``channels``.

    The largest divisor of ``channels`` that is at most ``max_groups`` (32, the GN paper and mmdet
    default) and leaves at least 2 channels per group: 256 -> 32, 64 -> 32, 48 -> 24, 32 -> 16,
    8 -> 4. One channel per group would turn GroupNorm into InstanceNorm, which discards the
    per-location contrast between channels that the towers rely on at tiny widths.
    """
    if channels < 2:
        return 1
    return max(g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 2)


class Scale(nn.Module):
    """A learnable scalar (init 1.0) multiplying the regression logits of one pyramid level."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GFLHead(nn.Module):
    """Shared-weight GFL head: separate cls / reg towers applied to every pyramid level.

    Each tower: ``num_convs`` x (3x3 conv without bias, GroupNorm(``gn_groups(width)``), ReLU).
    ``cls_out`` predicts C joint class-quality logits (sigmoid, bias = prior ``prior_prob``);
    ``reg_out`` predicts 4 x (reg_max + 1) bin logits per location, edges (left, top, right, bottom),
    multiplied by a per-level learnable ``Scale``. Init as mmdet's GFLHead: every conv N(0, 0.01).

    ``forward([P3..P7]) -> (cls_logits, reg_logits)``: per level (B, C, H_l, W_l) and
    (B, 4 * (reg_max + 1), H_l, W_l); regression logits are float32 even under autocast.
    ``forward_stages`` also returns every block's maps (:class:`HeadStages`); ``forward_from``
    continues either tower from any stage, which is how a teacher's head finishes a student's
    intermediate maps (CrossKD).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        num_convs: int = 4,
        reg_max: int = 16,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.cls_tower = _tower(in_channels, num_convs)
        self.reg_tower = _tower(in_channels, num_convs)
        self.cls_out = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start every class at sigmoid = prior_prob so the many negatives do not swamp QFL at step 0.
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    @property
    def num_blocks(self) -> int:
        """Blocks (conv, GN, ReLU) per tower."""
        return len(self.cls_tower) // 3

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_logits, reg_logits, _ = self.forward_stages(feats)
        return cls_logits, reg_logits

    def forward_stages(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], HeadStages]:
        """``forward``, plus the maps of every stage of both towers (stage 0 = ``feats``)."""
        cls_stages, reg_stages = [list(feats)], [list(feats)]
        for k in range(self.num_blocks):
            cls_stages.append([_block(self.cls_tower, k)(x) for x in cls_stages[-1]])
            reg_stages.append([_block(self.reg_tower, k)(x) for x in reg_stages[-1]])
        cls_logits = self._cls_out(cls_stages[-1])
        reg_logits = self._reg_out(reg_stages[-1])
        return cls_logits, reg_logits, HeadStages(cls_stages, reg_stages)

    def forward_from(
        self, stage: int, cls_maps: list[Tensor] | None = None, reg_maps: list[Tensor] | None = None
    ) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """Tower blocks ``stage..`` and the output convs on per-level stage maps (B, C, H_l, W_l);
        a tower whose maps are None is skipped (its output is None). ``stage`` in 0..num_blocks."""
        if not 0 <= stage <= self.num_blocks:
            raise ValueError(f"head stage {stage} out of range 0..{self.num_blocks}")
        cls_logits = reg_logits = None
        if cls_maps is not None:
            cls_logits = self._cls_out([_blocks(self.cls_tower, stage)(x) for x in cls_maps])
        if reg_maps is not None:
            reg_logits = self._reg_out([_blocks(self.reg_tower, stage)(x) for x in reg_maps])
        return cls_logits, reg_logits

    def _cls_out(self, maps: list[Tensor]) -> list[Tensor]:
        return [self.cls_out(x) for x in maps]

    def _reg_out(self, maps: list[Tensor]) -> list[Tensor]:
        return [scale(self.reg_out(x)).to(compute_dtype()) for x, scale in zip(maps, self.scales)]


def _block(tower: nn.Sequential, k: int) -> nn.Sequential:
    """Block k (conv, GN, ReLU) of a tower."""
    return tower[3 * k : 3 * k + 3]


def _blocks(tower: nn.Sequential, start: int) -> nn.Sequential:
    """Blocks ``start..`` of a tower (an empty Sequential, the identity, past the last)."""
    return tower[3 * start :]


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(gn_groups(channels), channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def dense_outputs(
    cls_logits: list[Tensor],
    reg_logits: list[Tensor],
    points: Tensor,
    strides: Tensor,
    level_sizes: list[tuple[int, int]],
    image_sizes: Tensor | None,
    grid: str = "centre",
) -> DenseOutputs:
    """Per-level GFL maps -> :class:`DenseOutputs` on the flattened grid.

    cls_logits: per level (B, C, H_l, W_l); reg_logits: per level (B, 4 * K, H_l, W_l).
    The levels are concatenated once here, so the detector's loss, the pairers and every
    distillation loss read the same (B, N, ...) tensors. Boxes are decoded for every location
    (cheap next to the towers; the graph is only used by losses that read boxes).
    """
    logits = torch.cat([x.flatten(2).transpose(1, 2) for x in cls_logits], dim=1)  # (B, N, C)
    reg = torch.cat([x.flatten(2).transpose(1, 2) for x in reg_logits], dim=1)  # (B, N, 4K)
    batch, num = reg.shape[:2]
    bins = BoxBins(reg.reshape(batch, num, 4, -1), points.unsqueeze(0), strides.reshape(1, -1, 1))
    valid = valid_locations(points, image_sizes, batch, grid)
    return DenseOutputs(
        logits=logits, boxes=bins.decode(), valid=valid, bins=bins, points=points, strides=strides, level_sizes=list(level_sizes), grid=grid
    )
