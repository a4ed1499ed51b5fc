"""AdaMixer-lite decoder layer (ASAG-A's decoder, spec §4), on the DynamicStage skeleton.

Registered as the stage ``"adamixer"``. Differences from Sparse R-CNN's ``DynamicStage`` (both are
:class:`~students.sparse.stage.RoIStage`: heads, FFN and box codings are shared):

- self-attention with the IoF bias and a box positional term (as the proposal block);
- instead of RoIAlign + DynamicConv, *adaptive 3-D sampling*: each query predicts, for G channel
  groups x P points, an offset ``(dx, dy)`` in units of its box size and a log-scale ``dz``; a point
  at scale ``2^(log2 sqrt(wh) + dz)`` reads every FPN level with weight
  ``softmax_l(-(level(scale) - log2 stride_l)^2 / 2)``, where ``level`` is RoIAlign's FPN rule;
- *adaptive mixing* of the (P, C / G) samples of each group: a per-query channel mix (C/G x C/G),
  LN, ReLU, a per-query spatial mix (P -> P_out), LN, ReLU, flattened, Linear -> D.

"lite": one level-rule instead of AdaMixer's P2-unit xyzr, no per-group level embedding, dropout 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from students.sparse.box_ops import xyxy_to_cxcywh
from students.sparse.config import BoxHeadConfig, RoIConfig
from students.sparse.stage import RoIStage, register_stage

__all__ = ["AdaptiveMixing", "AdaMixerStage"]


class AdaptiveMixing(nn.Module):
    """Adaptive 3-D sampling + mixing. ``forward(q (B, Q, D), boxes (B, Q, 4), features, strides) -> (B, Q, D)``."""

    def __init__(
        self, dim: int, feat_channels: int, groups: int = 4, points: int = 32, out_points: int = 128,
        roi_canonical: float = 224.0, canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if feat_channels % groups:
            raise ValueError(f"feature channels {feat_channels} must divide into {groups} sampling groups")
        self.groups, self.points, self.out_points = groups, points, out_points
        self.group_channels = feat_channels // groups
        self.level_offset = canonical_level - math.log2(roi_canonical)
        self.offsets = nn.Linear(dim, groups * points * 3)
        nn.init.zeros_(self.offsets.weight)
        with torch.no_grad():  # spread the points over the box, one level finer (spec: dxy ~ U(-.5, .5), dz = -1)
            bias = self.offsets.bias.view(groups, points, 3)
            bias[..., :2].uniform_(-0.5, 0.5)
            bias[..., 2].fill_(-1.0)
        c, p = self.group_channels, points
        self.params = nn.Linear(dim, groups * (c * c + p * out_points))
        nn.init.zeros_(self.params.weight)
        self.norm_channel = nn.LayerNorm(c)
        self.norm_spatial = nn.LayerNorm([c, out_points])
        self.out = nn.Linear(groups * c * out_points, dim)

    def sample(self, q: Tensor, boxes: Tensor, features: list[Tensor], strides: tuple[int, ...]) -> Tensor:
        """(B, Q, G, P, C / G) features at each query's adaptive points, mixed over levels."""
        batch, num, _ = q.shape
        g, p, c = self.groups, self.points, self.group_channels
        offsets = self.offsets(q).view(batch, num, g, p, 3)
        cx, cy, w, h = (t[..., None, None] for t in xyxy_to_cxcywh(boxes.detach()).unbind(-1))
        x, y = cx + offsets[..., 0] * w, cy + offsets[..., 1] * h  # (B, Q, G, P) pixels
        scale = 0.5 * torch.log2((w * h).clamp(min=1.0)) + offsets[..., 2]  # log2 side of each point
        level = scale + self.level_offset  # RoIAlign's rule, continuous
        logs = torch.tensor([math.log2(s) for s in strides], device=q.device)
        weights = (-0.5 * (level[..., None] - logs) ** 2).softmax(dim=-1)  # (B, Q, G, P, L)
        out = 0.0
        for index, (feat, stride) in enumerate(zip(features, strides)):
            height, width = feat.shape[-2:]
            grid = torch.stack([x / (width * stride), y / (height * stride)], dim=-1) * 2 - 1  # (B, Q, G, P, 2)
            grid = grid.permute(0, 2, 1, 3, 4).reshape(batch * g, num, p, 2)
            sampled = F.grid_sample(feat.reshape(batch * g, c, height, width), grid.to(feat.dtype), align_corners=False)
            sampled = sampled.view(batch, g, c, num, p).permute(0, 3, 1, 4, 2)  # (B, Q, G, P, C/G)
            out = out + sampled * weights[..., index, None]
        return out

    def forward(self, q: Tensor, boxes: Tensor, features: list[Tensor], strides: tuple[int, ...]) -> Tensor:
        batch, num, _ = q.shape
        g, p, c, po = self.groups, self.points, self.group_channels, self.out_points
        x = self.sample(q, boxes, features, strides)  # (B, Q, G, P, C)
        params = self.params(q).view(batch, num, g, c * c + p * po)
        channel_mix = params[..., : c * c].view(batch, num, g, c, c)
        spatial_mix = params[..., c * c :].view(batch, num, g, p, po)
        x = F.relu(self.norm_channel(x @ channel_mix))  # (B, Q, G, P, C)
        x = F.relu(self.norm_spatial(x.transpose(-1, -2) @ spatial_mix))  # (B, Q, G, C, P_out)
        return self.out(x.flatten(2))


class AdaMixerStage(RoIStage):
    """One AdaMixer-lite layer: a RoI stage with the IoF-biased, box-embedded self-attention and
    :class:`AdaptiveMixing` as its interaction."""

    def __init__(self, dim: int, feat_channels: int, num_classes: int, strides, sampling_groups: int = 4,
                 sampling_points: int = 32, mixing_out_points: int = 128, roi: RoIConfig = RoIConfig(), **kwargs) -> None:
        kwargs.update(box_pe=True, iof_bias=True)
        def mixing() -> AdaptiveMixing:
            return AdaptiveMixing(dim, feat_channels, sampling_groups, sampling_points, mixing_out_points, roi_canonical=roi.roi_canonical)

        super().__init__(dim, num_classes, strides, roi=roi, interact=mixing, **kwargs)

    def mix(self, features: list[Tensor], boxes: Tensor, q: Tensor, image_sizes: Tensor) -> Tensor:
        return self.interact(q, boxes, features, self.strides)


@register_stage("adamixer")
def _adamixer(dim: int, feat_channels: int, num_classes: int, strides, *, num_heads: int, ffn_dim: int,
              roi: RoIConfig, box: BoxHeadConfig, box_pe: bool, params: dict) -> AdaMixerStage:
    return AdaMixerStage(dim, feat_channels, num_classes, strides, sampling_groups=params["sampling_groups"],
                         sampling_points=params["sampling_points"], mixing_out_points=params["mixing_out_points"],
                         roi=roi, num_heads=num_heads, ffn_dim=ffn_dim, box=box)
