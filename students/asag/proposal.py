"""Query sources and the proposal block (spec §3).

A *query source* turns FPN maps into the initial boxes of a sparse detector. It is pluggable:

- :class:`LearnedAnchors`: a fixed number of learned boxes (image-normalised, stored pre-sigmoid,
  DAB-DETR style) plus learned content vectors (Sparse R-CNN's proposal features); with
  ``groups = K`` it holds K groups of them and returns all K in training, group 0 at inference.
- the ASAG generator (``students/asag/anchor_generator.py``, built separately) plugs in through the
  same :class:`QuerySource` protocol: per-image variable anchors padded to ``(B, Q_max, 4)`` with a
  ``valid`` mask. Sources are registered by name (:func:`register_query_source`), so a detector's
  ``query_source="asag"`` (+ ``query_source_params``) is part of its config and checkpoints rebuild it.

:class:`ProposalBlock` then makes content queries from the anchors: RoIAlign -> Linear -> LN, IoF-biased
self-attention with a box positional embedding, FFN, and supervised proposal heads (class logits
and an xyzr box update).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.structures import Predictions, Target
from students.asag.box_ops import cxcywh_to_xyxy, xyxy_to_xyzr, xyzr_to_xyxy
from students.asag.layers import FFN, MaskedSelfAttention, box_sine_embedding, mlp_head, roi_features

__all__ = ["Queries", "QuerySource", "LearnedAnchors", "ProposalBlock", "register_query_source", "create_query_source"]


@dataclass
class Queries:
    """Initial queries of a batch.

    boxes:   (B, Q, 4) xyxy input pixels (padding queries: any finite box, e.g. the whole image).
    valid:   (B, Q) bool; False for padding (masked as attention keys, never matched).
    content: (B | 1, Q, D) content vectors added to the RoI content, or None.
    groups:  (Q,) int64 query group of each query (Group DETR), or None for one group.
    extras:  whatever the source's own loss needs (e.g. the generator's anchor score logits);
             ``QuerySource.loss`` reads it back from ``SparsePredictions.queries``.
    """

    boxes: Tensor
    valid: Tensor
    content: Tensor | None = None
    groups: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def to(self, device) -> "Queries":
        move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return replace(self, boxes=move(self.boxes), valid=move(self.valid), content=move(self.content),
                       groups=move(self.groups), extras={k: move(v) for k, v in self.extras.items()})


@runtime_checkable
class QuerySource(Protocol):
    """What the detector calls to get its initial queries.

    ``forward(features, image_sizes, targets=None) -> Queries``: ``features`` are the FPN maps,
    ``image_sizes`` (B, 2) (h, w); ``targets`` is passed in training when the caller has them (the
    generator's training patches need GT), None otherwise.
    Optionally ``loss(queries, targets, image_sizes) -> dict[str, Tensor]`` of weighted terms, which
    the detector adds to its own losses (the generator's anchor losses, spec §2.7).
    """

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None) -> Queries: ...


class LearnedAnchors(nn.Module):
    """``num_queries x groups`` learned boxes and content vectors.

    Boxes are stored as logits of image-normalised (cx, cy, w, h), initialised with random centres and
    sides ``init_size`` of the image; they become pixels of each image's (h, w). Training returns every
    group (group ids ``repeat_interleave``), inference the first ``num_queries`` (group 0) only, so the
    inference cost does not depend on ``groups``.
    """

    def __init__(self, num_queries: int, dim: int, groups: int = 1, init_size: float = 0.25) -> None:
        super().__init__()
        self.num_queries, self.groups = num_queries, groups
        total = num_queries * groups
        centres = torch.rand(total, 2).clamp(0.02, 0.98)
        sizes = torch.full((total, 2), init_size)
        self.box_logits = nn.Parameter(torch.logit(torch.cat([centres, sizes], dim=1)))
        self.content = nn.Parameter(torch.zeros(total, dim))

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None) -> Queries:
        count = self.num_queries * (self.groups if self.training else 1)
        batch = features[0].shape[0]
        h, w = image_sizes[:, 0].float(), image_sizes[:, 1].float()
        scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]  # (B, 1, 4)
        boxes = cxcywh_to_xyxy(self.box_logits[:count].sigmoid()[None] * scale)  # (B, Q, 4)
        valid = torch.ones(batch, count, dtype=torch.bool, device=boxes.device)
        groups = None
        if self.training and self.groups > 1:
            groups = torch.arange(self.groups, device=boxes.device).repeat_interleave(self.num_queries)
        return Queries(boxes, valid, self.content[:count][None], groups)


# ------------------------------------------------------------------------------ source registry
QuerySourceFactory = Callable[..., nn.Module]
_SOURCES: dict[str, QuerySourceFactory] = {}


def register_query_source(name: str) -> Callable[[QuerySourceFactory], QuerySourceFactory]:
    """Register a query-source factory under ``name`` (the detector's ``query_source`` parameter).

    The factory is called as ``factory(num_queries=..., dim=..., groups=..., strides=..., **query_source_params)``
    and returns an ``nn.Module`` implementing :class:`QuerySource`; it may ignore what it does not use.
    """

    def wrap(fn: QuerySourceFactory) -> QuerySourceFactory:
        if name in _SOURCES and _SOURCES[name] is not fn:
            raise ValueError(f"query source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return wrap


def create_query_source(name: str, num_queries: int, dim: int, groups: int, strides: tuple[int, ...], params: dict | None = None) -> nn.Module:
    """Build the registered source ``name``; ``ConfigError`` naming the known sources otherwise."""
    if name not in _SOURCES:
        raise ConfigError(f"unknown query source {name!r}; known: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[name](num_queries=num_queries, dim=dim, groups=groups, strides=strides, **(params or {}))


@register_query_source("learned")
def _learned(num_queries: int, dim: int, groups: int, strides: tuple[int, ...], init_size: float = 0.25) -> LearnedAnchors:
    return LearnedAnchors(num_queries, dim, groups, init_size)


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
