"""One sparse decoder layer: Sparse R-CNN dynamic interaction (ASAG-S, spec §4).

``DynamicStage.forward(features, boxes, q, valid, groups, image_sizes) -> (q', Predictions)``:

1. self-attention over the queries (8 heads; optional box positional term), padded keys and
   other query groups masked;
2. dynamic interaction with the RoI features of ``boxes``: each query generates two matrices
   P1 (C x d) and P2 (d x D); ``relu(LN(relu(LN(F P1)) P2))`` on the 7 x 7 RoI features F, flattened,
   Linear -> D, LN, ReLU; residual + LN;
3. FFN + LN;
4. heads: class logits (prior 0.01) and either Sparse R-CNN deltas (``box_head="delta"``,
   weights 2, 2, 1, 1) or per-edge bin logits (``box_head="bins"``): K bins per edge measured
   from the input box's centre in units of ``bin_fraction`` of its width / height, decoded by
   the integral (``BoxBins.decode``) and carried as ``Predictions.bins`` for DFL and LD.

``boxes`` are the stage's input boxes; callers pass them detached (DAB-DETR: no gradient
through the box chain between stages).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from distill.structures import BoxBins, Predictions
from students.asag.box_ops import apply_deltas, bin_reference
from students.asag.layers import FFN, MaskedSelfAttention, box_sine_embedding, mlp_head, roi_features

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


class DynamicStage(nn.Module):
    """One ASAG-S / Sparse R-CNN decoder layer with its heads (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        feat_channels: int,
        num_classes: int,
        strides: Sequence[int],
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dynamic_dim: int = 64,
        roi_size: int = 7,
        roi_canonical: float = 224.0,
        cls_layers: int = 1,
        reg_layers: int = 3,
        box_head: Literal["delta", "bins"] = "delta",
        num_bins: int = 17,
        bin_fraction: float = 0.125,
        box_pe: bool = False,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if box_head not in ("delta", "bins"):
            raise ValueError(f"box_head must be 'delta' or 'bins', got {box_head!r}")
        self.strides, self.roi_size, self.roi_canonical = tuple(strides), roi_size, roi_canonical
        self.box_head, self.num_bins, self.bin_fraction = box_head, num_bins, bin_fraction
        self.num_heads = num_heads
        self.self_attn = MaskedSelfAttention(dim, num_heads)
        self.pos = nn.Linear(dim, dim) if box_pe else None
        self.interact = DynamicConv(dim, feat_channels, dynamic_dim, roi_size)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)
        self.cls_tower, self.reg_tower = mlp_head(dim, cls_layers, bias=False), mlp_head(dim, reg_layers)
        self.cls_out = nn.Linear(dim, num_classes)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        self.reg_out = nn.Linear(dim, 4 * num_bins if box_head == "bins" else 4)
        nn.init.zeros_(self.reg_out.weight)
        if box_head == "bins":
            # Start peaked at the identity box: every edge at half the input box's side.
            identity = 0.5 / bin_fraction
            bins = torch.arange(num_bins, dtype=torch.float32)
            with torch.no_grad():
                self.reg_out.bias.copy_((-0.5 * (bins - identity) ** 2).repeat(4))
        else:
            nn.init.zeros_(self.reg_out.bias)

    def forward(
        self, features: list[Tensor], boxes: Tensor, q: Tensor, valid: Tensor, groups: Tensor | None, image_sizes: Tensor
    ) -> tuple[Tensor, Predictions]:
        """features: FPN maps; boxes (B, Q, 4) xyxy px (detached); q (B, Q, D); valid (B, Q); groups (Q,) | None."""
        batch, num, dim = q.shape
        pos = self.pos(box_sine_embedding(boxes, image_sizes, dim)) if self.pos is not None else None
        q = self.self_attn(q, valid, groups, pos, boxes)
        q = self.norm(q + self.mix(features, boxes, q, image_sizes))
        q = self.ffn(q)
        return q, self.predict(q, boxes, valid)

    def mix(self, features: list[Tensor], boxes: Tensor, q: Tensor, image_sizes: Tensor) -> Tensor:
        """Query-feature interaction (B, Q, D): DynamicConv on the 7 x 7 RoI features of ``boxes``."""
        batch, num, dim = q.shape
        rois = roi_features(features, self.strides, boxes, self.roi_size, self.roi_canonical)  # (B*Q, C, S, S)
        return self.interact(q.reshape(batch * num, dim), rois).view(batch, num, dim)

    def predict(self, q: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """Class logits and refined boxes (deltas or bins) of queries q (B, Q, D) on their input boxes."""
        batch, num, _ = q.shape
        logits = self.cls_out(self.cls_tower(q))  # (B, Q, C)
        reg = self.reg_out(self.reg_tower(q))
        if self.box_head == "delta":
            return Predictions(logits, apply_deltas(boxes, reg), valid)
        centers, spacing = bin_reference(boxes, self.bin_fraction)
        bins = BoxBins(reg.view(batch, num, 4, self.num_bins), centers, spacing)
        return Predictions(logits, bins.decode(), valid, bins=bins)
