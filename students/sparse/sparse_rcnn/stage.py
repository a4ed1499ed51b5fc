"""Sparse R-CNN's decoder stage: dynamic interaction with RoI features (also ASAG-S's layer, spec §4).

Registered as the stage ``"dynamic"``. The interaction: each query generates two matrices P1 (C x d)
and P2 (d x D); ``relu(LN(relu(LN(F P1)) P2))`` on the 7 x 7 RoI features F, flattened,
Linear -> D, LN, ReLU. Everything else of the layer (self-attention, FFN, heads) is
:class:`~students.sparse.stage.RoIStage`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from students.sparse.config import BoxHeadConfig, RoIConfig
from students.sparse.layers import roi_features
from students.sparse.stage import RoIStage, register_stage

__all__ = ["DynamicStage", "DynamicConv"]


class DynamicConv(nn.Module):
    """Query-conditioned 1x1 convolutions on RoI features (Sparse R-CNN's DynamicConv).

    ``forward(q (N, D), rois (N, C, S, S)) -> (N, D)``.
    """

    def __init__(self, dim: int, feat_channels: int, dynamic_dim: int = 64, roi_size: int = 7) -> None:
        super().__init__()
        self.feat_channels, self.dynamic_dim, self.dim = feat_channels, dynamic_dim, dim
        self.params = nn.Linear(dim, feat_channels * dynamic_dim + dynamic_dim * dim)
        self.norm1, self.norm2 = nn.LayerNorm(dynamic_dim), nn.LayerNorm(dim)
        self.out = nn.Sequential(nn.Linear(dim * roi_size * roi_size, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.act = nn.ReLU(inplace=True)

    def forward(self, q: Tensor, rois: Tensor) -> Tensor:
        feats = rois.flatten(2).transpose(1, 2)  # (N, S*S, C)
        params = self.params(q)
        split = self.feat_channels * self.dynamic_dim
        p1 = params[:, :split].view(-1, self.feat_channels, self.dynamic_dim)  # (N, C, d)
        p2 = params[:, split:].view(-1, self.dynamic_dim, self.dim)  # (N, d, D)
        x = self.act(self.norm1(torch.bmm(feats, p1)))
        x = self.act(self.norm2(torch.bmm(x, p2)))  # (N, S*S, D)
        return self.out(x.flatten(1))


class DynamicStage(RoIStage):
    """One Sparse R-CNN / ASAG-S decoder layer with its heads."""

    def __init__(
        self, dim: int, feat_channels: int, num_classes: int, strides: Sequence[int], dynamic_dim: int = 64,
        roi: RoIConfig = RoIConfig(), **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_classes, strides, roi=roi, interact=lambda: DynamicConv(dim, feat_channels, dynamic_dim, roi.roi_size), **kwargs)

    def mix(self, features: list[Tensor], boxes: Tensor, q: Tensor, image_sizes: Tensor) -> Tensor:
        """DynamicConv on the RoI features of ``boxes`` -> (B, Q, D)."""
        batch, num, dim = q.shape
        rois = roi_features(features, self.strides, boxes, self.roi_size, self.roi_canonical)  # (B*Q, C, S, S)
        return self.interact(q.reshape(batch * num, dim), rois).view(batch, num, dim)


@register_stage("dynamic")
def _dynamic(dim: int, feat_channels: int, num_classes: int, strides: Sequence[int], *, num_heads: int, ffn_dim: int,
             roi: RoIConfig, box: BoxHeadConfig, box_pe: bool, params: dict[str, Any]) -> DynamicStage:
    return DynamicStage(dim, feat_channels, num_classes, strides, dynamic_dim=params["dynamic_dim"], roi=roi,
                        num_heads=num_heads, ffn_dim=ffn_dim, box=box, box_pe=box_pe)
