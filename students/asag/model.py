"""Sparse (query-based) detectors: one-layer ASAG students and a multi-stage Sparse R-CNN teacher.

Pipeline (``features`` then ``head``)::

    images -> TimmBackbone (C_l at ``strides``) -> PyramidFPN (P_l, no extra levels)
           -> query source (LearnedAnchors | the ASAG generator): boxes (B, Q, 4), valid (B, Q)
           -> ProposalBlock: q0 (B, Q, D) + supervised proposals
           -> ``stages`` DynamicStage layers stacked (boxes detached between stages), the last one
              with ``parallel_heads`` copies in training (ASAG's auxiliary one-layer heads, spec §4)

Training returns every head: ``Predictions`` of the main head (last stage, last parallel copy) with
``aux`` = [proposals, earlier stages or the other parallel copies]; inference runs the proposal block
and the main path only (no aux, group 0 only).

Levels: the spec's P2-P5 (``strides=(4, 8, 16, 32)``) is the factory default; the small-input
recipes (128 px scenes) use P3-P5 (``strides=(8, 16, 32)``): a 16 x 16 P3 already resolves the
smallest scene objects (~10 px) with 7 x 7 RoIs, and P2 would cost 4x P3's FPN convolutions.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.structures import Detections, DetectorSpec, Matches, Predictions, Target
from students.asag.adamixer import AdaMixerStage
from students.asag.criterion import SetCriterion
from students.asag.decoder import DynamicStage
from students.asag.layers import PyramidFPN
from students.asag.matcher import HungarianMatcher
from students.asag.postprocess import postprocess_sparse
from students.asag.proposal import ProposalBlock, Queries, QuerySource, create_query_source
from students.backbone import TimmBackbone
from students.registry import register_student

__all__ = ["SparseDetector", "SparsePredictions"]


@dataclass
class SparsePredictions(Predictions):
    """Predictions plus the queries they started from (``queries.extras`` feeds the source's loss)."""

    queries: Queries | None = None

    def detach(self) -> "SparsePredictions":
        out = super().detach()
        if self.queries is not None:
            q = self.queries
            lift = lambda t: t.detach().clone() if isinstance(t, Tensor) else t  # noqa: E731
            out.queries = Queries(lift(q.boxes), lift(q.valid), lift(q.content), lift(q.groups), {k: lift(v) for k, v in q.extras.items()})
        return out


class SparseDetector(nn.Module):
    """Query-based detector on any timm backbone (see the module docstring).

    Args:
        backbone, pretrained, norm_eval: as ``students.gfl.GFL`` (``students.backbone``).
        num_classes:     C (sigmoid, no background).
        strides:         FPN levels read by RoIAlign: (4, 8, 16, 32) = P2-P5, (8, 16, 32) = P3-P5.
        fpn_channels:    FPN width; also the query width D.
        num_queries:     learned anchors per group (a hint to other sources).
        query_source:    registered query source (``students.asag.proposal.register_query_source``):
                         "learned" (LearnedAnchors) or e.g. the ASAG generator once registered;
                         ``query_source_params`` are its extra keyword arguments (JSON-able).
        groups:          Group DETR query groups K (training only; inference uses group 0).
        stages:          stacked decoder layers (1 = ASAG-S, 6 = Sparse R-CNN).
        parallel_heads:  one-layer heads in parallel on the same proposals (ASAG: 4), training only.
        box_head:        "delta" (Sparse R-CNN deltas) or "bins" (per-edge distributions, LD-ready).
        num_bins, bin_fraction: bins per edge and bin width as a fraction of the proposal side.
        num_heads, ffn_dim, dynamic_dim, roi_size, roi_canonical: decoder sizes (spec §4),
                         ``roi_canonical`` the box side that maps to P4 in RoIAlign.
        box_pe:          sine box embedding in the decoder self-attention (DAB-style).
        decoder:         "dynamic" (Sparse R-CNN DynamicConv, ASAG-S) or "adamixer" (AdaMixer-lite,
                         ASAG-A: adaptive 3-D sampling + mixing; ``sampling_groups`` x
                         ``sampling_points`` points per query, mixed to ``mixing_out_points``).
        query_weighting: ASAG's Query Weighting in the losses (spec §6: on for one-layer heads,
                         off for deep decoders, where it hurts).
        cls_weight, l1_weight, giou_weight, dfl_weight, area_weight: loss weights, ``area_weight``
                         the official code's A (1 = off).
        max_detections, score_thresh, nms_iou: ``postprocess`` settings.
    """

    family = "sparse"

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 80,
        strides: tuple[int, ...] = (4, 8, 16, 32),
        fpn_channels: int = 256,
        num_queries: int = 100,
        query_source: str = "learned",
        query_source_params: dict | None = None,
        groups: int = 1,
        stages: int = 1,
        parallel_heads: int = 4,
        box_head: Literal["delta", "bins"] = "delta",
        num_bins: int = 17,
        bin_fraction: float = 0.125,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dynamic_dim: int = 64,
        roi_size: int = 7,
        roi_canonical: float = 224.0,
        box_pe: bool = False,
        decoder: Literal["dynamic", "adamixer"] = "dynamic",
        sampling_groups: int = 4,
        sampling_points: int = 32,
        mixing_out_points: int = 128,
        query_weighting: bool = True,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        dfl_weight: float = 0.25,
        area_weight: float = 1.0,
        max_detections: int = 100,
        score_thresh: float = 0.0,
        nms_iou: float | None = None,
        pretrained: str | Path | None = None,
        norm_eval: bool | None = None,
    ) -> None:
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        _check_args(num_classes, fpn_channels, num_queries, groups, stages, parallel_heads, num_heads, box_head)
        if decoder not in ("dynamic", "adamixer") or fpn_channels % sampling_groups:
            raise ConfigError(f"sparse detector: invalid decoder = {decoder!r} / sampling_groups = {sampling_groups!r}")
        norm_eval = pretrained is not None if norm_eval is None else bool(norm_eval)
        self.num_classes, self.strides, self.fpn_channels = num_classes, tuple(strides), fpn_channels
        self.stages_count, self.parallel_heads, self.groups = stages, parallel_heads, groups
        self.box_head, self.num_bins = box_head, num_bins
        self.max_detections, self.score_thresh, self.nms_iou = max_detections, score_thresh, nms_iou
        self.backbone = TimmBackbone(backbone, pretrained=pretrained, norm_eval=norm_eval, strides=self.strides)
        self.fpn = PyramidFPN(self.backbone.channels, fpn_channels)
        self.query_source: nn.Module = create_query_source(query_source, num_queries, fpn_channels, groups, self.strides, query_source_params)
        sizes = dict(num_heads=num_heads, ffn_dim=ffn_dim, roi_size=roi_size, roi_canonical=roi_canonical)
        self.proposal = ProposalBlock(fpn_channels, fpn_channels, num_classes, self.strides, **sizes)
        stage_sizes = dict(box_head=box_head, num_bins=num_bins, bin_fraction=bin_fraction, box_pe=box_pe, **sizes)
        if decoder == "adamixer":
            mixing = dict(sampling_groups=sampling_groups, sampling_points=sampling_points, mixing_out_points=mixing_out_points)
            stage = lambda: AdaMixerStage(fpn_channels, fpn_channels, num_classes, self.strides, **mixing, **stage_sizes)  # noqa: E731
        else:
            stage = lambda: DynamicStage(  # noqa: E731
                fpn_channels, fpn_channels, num_classes, self.strides, dynamic_dim=dynamic_dim, **stage_sizes
            )
        self.stages = nn.ModuleList(stage() for _ in range(stages - 1))
        self.heads = nn.ModuleList(stage() for _ in range(parallel_heads))  # the last stage, in parallel copies
        self.head_embed = nn.Parameter(torch.zeros(parallel_heads, fpn_channels)) if parallel_heads > 1 else None
        matcher = HungarianMatcher(cls_weight, l1_weight, giou_weight, area_weight=area_weight)
        self.criterion = SetCriterion(
            matcher, cls_weight, l1_weight, giou_weight, dfl_weight, query_weighting=query_weighting, area_weight=area_weight
        )
        self.resolved_params = {"norm_eval": norm_eval}
        params.update(self.resolved_params, pretrained=None if pretrained is None else str(pretrained), strides=list(strides))
        self.config: dict = {"name": "sparse", "params": params}

    # -------------------------------------------------------------------------------- contract
    @property
    def spec(self) -> DetectorSpec:
        bins = self.num_bins if self.box_head == "bins" else None
        return DetectorSpec("sparse", self.num_classes, self.strides, self.fpn_channels, bins, query_boxes=True)

    def set_query_source(self, source: QuerySource) -> None:
        """Replace the query source by a module (experiments; ``config`` does not record it, prefer
        the ``query_source`` parameter for anything that is checkpointed)."""
        self.query_source = source

    def features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> FPN maps at ``strides``, each (B, fpn_channels, ceil(H / s), ceil(W / s))."""
        return self.fpn(self.backbone(images))

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets: list[Target] | None = None) -> SparsePredictions:
        """Queries -> proposals -> decoder. Training: all heads (aux filled); eval: the main path only."""
        image_sizes = self._sizes(features, image_sizes)
        return self._decode(features, self.query_source(features, image_sizes, targets), image_sizes)

    def decode_queries(
        self, features: list[Tensor], image_sizes: Tensor | None, boxes: Tensor, valid: Tensor, aux: bool = True
    ) -> SparsePredictions:
        """The proposal block and decoder on given query boxes (B, K, 4) xyxy px, valid (B, K).

        KD-DETR's shared distillation queries: fed the teacher's boxes, query k of the result
        corresponds to the teacher's prediction k. A separate pass over the same features is the
        same as an extra query group behind a block-diagonal attention mask: the detector's own
        queries never see these (and at inference nothing is added). ``aux=False``: only the main
        path, as at inference (the terms read the final head only: the parallel training heads,
        three quarters of the pass, are then skipped; the main head's values are the same).
        """
        return self._decode(features, Queries(boxes, valid), self._sizes(features, image_sizes), aux)

    def _decode(self, features: list[Tensor], queries: Queries, image_sizes: Tensor, aux_heads: bool = True) -> SparsePredictions:
        q, proposals = self.proposal(features, queries, image_sizes)
        boxes, aux = proposals.boxes.detach(), [proposals]
        for stage in self.stages:
            q, pred = stage(features, boxes, q, queries.valid, queries.groups, image_sizes)
            boxes = pred.boxes.detach()
            aux.append(pred)
        keep_aux = self.training and aux_heads
        copies = range(self.parallel_heads) if keep_aux else [self.parallel_heads - 1]
        for k in copies:
            q_k = q if self.head_embed is None else q + self.head_embed[k]
            _, pred = self.heads[k](features, boxes, q_k, queries.valid, queries.groups, image_sizes)
            aux.append(pred)
        main = aux.pop()
        return SparsePredictions(main.logits, main.boxes, main.valid, main.bins, aux if keep_aux else [], queries)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> SparsePredictions:
        return self.head(self.features(images), image_sizes)

    def aux_names(self, count: int) -> list[str]:
        """Loss-key suffixes of ``predictions.aux``: "prop", then "stage{i}" / "head{k}"."""
        names = ["prop"] + [f"stage{i}" for i in range(len(self.stages))] + [f"head{k}" for k in range(self.parallel_heads - 1)]
        return names[:count]

    def loss(
        self, predictions: Predictions, targets: list[Target], image_sizes: Tensor | None
    ) -> tuple[dict[str, Tensor], Matches]:
        """Weighted terms of every head (each with its own Hungarian matching) and the main head's matches
        (``Matches.aux``: each aux head's own, in ``predictions.aux`` order; group 0 only with groups)."""
        image_sizes = self._sizes_from(predictions, image_sizes)
        groups = getattr(predictions, "queries", None)
        groups = groups.groups if groups is not None else None
        losses, matches = self.criterion(predictions, targets, image_sizes, groups, self.aux_names(len(predictions.aux)))
        source_loss = getattr(self.query_source, "loss", None)
        if source_loss is not None and getattr(predictions, "queries", None) is not None:
            losses.update(source_loss(predictions.queries, targets, image_sizes))
        return losses, _first_group(matches, groups)

    @torch.no_grad()
    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor | None) -> Matches:
        """The main head's Hungarian matching alone (group 0 when groups are present)."""
        image_sizes = self._sizes_from(predictions, image_sizes)
        groups = getattr(predictions, "queries", None)
        groups = groups.groups if groups is not None else None
        targets = [t.to(predictions.logits.device) for t in targets]
        return _first_group(self.criterion.matcher(predictions, targets, image_sizes, groups), groups)

    def postprocess(self, predictions: Predictions, image_sizes: Tensor | None) -> list[Detections]:
        return postprocess_sparse(predictions, image_sizes, self.max_detections, self.score_thresh, self.nms_iou)

    # --------------------------------------------------------------------------------- helpers
    def _sizes(self, features: list[Tensor], image_sizes: Tensor | None) -> Tensor:
        if image_sizes is not None:
            return image_sizes.to(features[0].device)
        h, w = features[0].shape[-2] * self.strides[0], features[0].shape[-1] * self.strides[0]
        return torch.tensor([[h, w]] * features[0].shape[0], device=features[0].device)

    def _sizes_from(self, predictions: Predictions, image_sizes: Tensor | None) -> Tensor:
        if image_sizes is not None:
            return image_sizes.to(predictions.logits.device)
        raise ValueError("sparse losses need image_sizes (boxes are normalised by the image size)")


def _first_group(matches: Matches, groups: Tensor | None) -> Matches:
    """Matches restricted to group 0 (the inference group), so each GT has one prediction."""
    if groups is None:
        return matches
    keep = [groups[i] == 0 for i in matches.pred_index]
    weight = None if matches.weight is None else [w[k] for w, k in zip(matches.weight, keep)]
    aux = [_first_group(a, groups) for a in matches.aux]
    return Matches([i[k] for i, k in zip(matches.pred_index, keep)], [g[k] for g, k in zip(matches.gt_index, keep)], weight, aux=aux)


def _check_args(num_classes, fpn_channels, num_queries, groups, stages, parallel_heads, num_heads, box_head) -> None:
    checks = {
        "num_classes": (num_classes, num_classes >= 1),
        "fpn_channels": (fpn_channels, fpn_channels >= 8 and fpn_channels % 8 == 0 and fpn_channels % num_heads == 0),
        "num_queries": (num_queries, num_queries >= 1),
        "groups": (groups, groups >= 1),
        "stages": (stages, stages >= 1),
        "parallel_heads": (parallel_heads, parallel_heads >= 1),
        "box_head": (box_head, box_head in ("delta", "bins")),
    }
    for key, (value, ok) in checks.items():
        if not ok:
            raise ConfigError(f"sparse detector: invalid {key} = {value!r}")


# --------------------------------------------------------------------------------- registry entries
def _register(name: str, doc: str, **defaults) -> None:
    """Register a factory with SparseDetector's keyword parameters, ``defaults`` replacing its own."""
    base = inspect.signature(SparseDetector.__init__)
    params = [p.replace(default=defaults.get(p.name, p.default)) for p in list(base.parameters.values())[1:]]
    signature = base.replace(parameters=params, return_annotation="SparseDetector")

    def factory(**kwargs) -> SparseDetector:
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        args["strides"] = tuple(args["strides"])  # a checkpoint's JSON config stores a list
        return SparseDetector(**args)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = __name__
    factory.__signature__ = signature
    register_student(factory)


_register(
    "asag_s",
    "ASAG-S student: proposal block + one Sparse R-CNN decoder layer, 4 parallel heads in training, Query "
    "Weighting; learned anchors until the ASAG generator is plugged in (set_query_source).",
)
_register(
    "asag_s_gen",
    "ASAG-S fed by the Adaptive Sparse Anchor Generator (query_source 'asag'; P3-P5 FPN, image-specific "
    "anchors padded per batch): proposal block + one dynamic layer, 4 parallel heads in training, Query Weighting.",
    query_source="asag",
    strides=(8, 16, 32),
)
_register(
    "asag_a",
    "ASAG-A-style student: proposal block + one AdaMixer-lite decoder layer (adaptive sampling and mixing), 4 parallel "
    "heads in training, Query Weighting.",
    decoder="adamixer",
)
_register(
    "sparse_rcnn6",
    "Multi-stage sparse teacher: 6 stacked dynamic decoder stages, boxes refined and detached per stage, every "
    "stage supervised, focal loss without Query Weighting, box positional term in self-attention.",
    stages=6,
    parallel_heads=1,
    query_weighting=False,
    box_pe=True,
)
