"""The proposal block of the RoI-based sparse detectors (ASAG spec §3): content queries from anchors.

Used by every detector built on :class:`~students.sparse.roi_detector.SparseDetector` (ASAG and the
multi-stage Sparse R-CNN teacher); DAB-DETR has no proposal block (its content starts at zero).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.structures import Predictions
from students.sparse.box_ops import xyxy_to_xyzr, xyzr_to_xyxy
from students.sparse.layers import FFN, MaskedSelfAttention, box_sine_embedding, mlp_head, roi_features
from students.sparse.queries import Queries

__all__ = ["ProposalBlock"]


class ProposalBlock(nn.Module):
    """Content queries and supervised proposals from anchors (spec §3).

    ``forward(features, queries, image_sizes) -> (q0 (B, Q, D), Predictions of the proposals)``:
    RoIAlign ``roi_size`` x ``roi_size`` of each anchor -> Linear -> LN (+ source content) = q0;
    self-attention over ``q0 + PE(box)`` with the additive per-head bias ``tau_h log(IoF_ij + 1e-7)``
    (``tau_h`` learned, init U(0, 4)), padded keys and other query groups masked; FFN; class head
    and an xyzr update ``xy += d_xy 2^z, (z, r) += d_(z, r)``. The proposal boxes of the returned
    Predictions keep their gradient (they are supervised); the decoder takes them detached.
    """

    def __init__(
        self,
        dim: int,
        feat_channels: int,
        num_classes: int,
        strides: Sequence[int],
        num_heads: int = 8,
        ffn_dim: int = 2048,
        roi_size: int = 7,
        roi_canonical: float = 224.0,
        cls_layers: int = 1,
        reg_layers: int = 3,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides, self.roi_size, self.roi_canonical, self.num_heads = tuple(strides), roi_size, roi_canonical, num_heads
        self.embed = nn.Sequential(nn.Linear(feat_channels * roi_size * roi_size, dim), nn.LayerNorm(dim))
        self.self_attn = MaskedSelfAttention(dim, num_heads, iof_bias=True)
        self.ffn = FFN(dim, ffn_dim)
        self.cls_tower, self.reg_tower = mlp_head(dim, cls_layers, bias=False), mlp_head(dim, reg_layers)
        self.cls_out, self.reg_out = nn.Linear(dim, num_classes), nn.Linear(dim, 4)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.reg_out.weight)
        nn.init.zeros_(self.reg_out.bias)

    def forward(self, features: list[Tensor], queries: Queries, image_sizes: Tensor) -> tuple[Tensor, Predictions]:
        anchors = queries.boxes.detach()
        batch, num = anchors.shape[:2]
        rois = roi_features(features, self.strides, anchors, self.roi_size, self.roi_canonical)  # (B*Q, C, S, S)
        q = self.embed(rois.flatten(1)).view(batch, num, -1)  # (B, Q, D)
        if queries.content is not None:
            q = q + queries.content
        pos = box_sine_embedding(anchors, image_sizes, q.shape[-1])
        q = self.ffn(self.self_attn(q, queries.valid, queries.groups, pos, anchors, residual_with_pos=True))
        logits = self.cls_out(self.cls_tower(q))  # (B, Q, C)
        delta = self.reg_out(self.reg_tower(q))  # (B, Q, 4)
        # The update starts from the source's boxes as given: learned anchors get their gradient here
        # (the proposal loss); a generator hands over detached anchors (spec §2.3), RoIAlign never differentiates them.
        xyzr = xyxy_to_xyzr(queries.boxes)
        xy = xyzr[..., :2] + delta[..., :2] * torch.exp2(xyzr[..., 2:3])
        boxes = xyzr_to_xyxy(torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], dim=-1))
        return q, Predictions(logits, boxes, queries.valid)
