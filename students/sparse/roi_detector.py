"""RoI-based sparse detectors: one-layer ASAG students and the multi-stage Sparse R-CNN teacher.

Pipeline (``features`` then ``head``)::

    images -> TimmBackbone (C_l at ``strides``) -> PyramidFPN (P_l, no extra levels)
           -> query source (LearnedAnchors | the ASAG generator): boxes (B, Q, 4), valid (B, Q)
           -> ProposalBlock: q0 (B, Q, D) + supervised proposals
           -> ``stages`` RoI stages stacked (boxes detached between stages), the last one with
              ``parallel_heads`` copies in training (ASAG's auxiliary one-layer heads, spec §4)

The stage is a registered decoder (``decoder``: "dynamic" = Sparse R-CNN's DynamicConv,
``students.sparse.sparse_rcnn``; "adamixer" = ASAG-A's adaptive mixing, ``students.sparse.asag``).
Training returns every head: ``Predictions`` of the main head (last stage, last parallel copy) with
``aux`` = [proposals, earlier stages or the other parallel copies]; inference runs the proposal block
and the main path only (no aux, group 0 only).

Levels: the spec's P2-P5 (``strides=(4, 8, 16, 32)``) is the factory default; the small-input
recipes (128 px scenes) use P3-P5 (``strides=(8, 16, 32)``): a 16 x 16 P3 already resolves the
smallest scene objects (~10 px) with 7 x 7 RoIs, and P2 would cost 4x P3's FPN convolutions.

Options come in typed groups (:class:`QueryConfig`, :class:`DecoderConfig` here;
``BoxHeadConfig``, ``RoIConfig``, ``LossConfig``, ``PostprocessConfig`` in ``students.sparse.config``);
the registered names take them flat (:func:`build_sparse_detector`), as recipes write them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.structures import Predictions, Target
from students.backbone import TimmBackbone
from students.registry import ParamCheck, raise_failed
from students.sparse.config import (
    BoxHeadConfig,
    LossConfig,
    PostprocessConfig,
    RoIConfig,
    common_checks,
    pick,
    roi_checks,
)
from students.sparse.detector import QueryCrossing, QueryDetector, SparsePredictions, build_criterion
from students.sparse.layers import PyramidFPN
from students.sparse.proposal import ProposalBlock
from students.sparse.queries import Queries, QuerySource, check_query_source, create_query_source
from students.sparse.stage import create_stage, list_stages

__all__ = ["SparseDetector", "SparsePredictions", "QueryConfig", "DecoderConfig", "build_sparse_detector"]


@dataclass(frozen=True)
class QueryConfig:
    """Where the first boxes come from: a registered ``query_source`` ("learned" or e.g. "asag") with its
    JSON-able ``query_source_params``; ``num_queries`` learned anchors per group (a hint to other
    sources); ``groups`` Group DETR query groups K (training only; inference uses group 0)."""

    num_queries: int = 100
    query_source: str = "learned"
    query_source_params: dict | None = None
    groups: int = 1


@dataclass(frozen=True)
class DecoderConfig:
    """The stacked decoder: ``stages`` layers (1 = ASAG-S, 6 = Sparse R-CNN), the last in
    ``parallel_heads`` copies in training (ASAG: 4); ``decoder`` the registered stage with its sizes."""

    decoder: str = "dynamic"
    stages: int = 1
    parallel_heads: int = 4
    num_heads: int = 8
    ffn_dim: int = 2048
    box_pe: bool = False
    dynamic_dim: int = 64
    sampling_groups: int = 4
    sampling_points: int = 32
    mixing_out_points: int = 128


class SparseDetector(QueryDetector):
    """RoI-based query detector on any timm backbone (see the module docstring).

    Args:
        backbone, pretrained, norm_eval: as ``students.gfl.GFL`` (``students.backbone``).
        num_classes: C (sigmoid, no background).
        strides:     FPN levels read by RoIAlign: (4, 8, 16, 32) = P2-P5, (8, 16, 32) = P3-P5.
        fpn_channels: FPN width; also the query width D.
        queries, decoder, roi, box, loss, post: the option groups.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 80,
        strides: tuple[int, ...] = (4, 8, 16, 32),
        fpn_channels: int = 256,
        *,
        queries: QueryConfig = QueryConfig(),
        decoder: DecoderConfig = DecoderConfig(),
        roi: RoIConfig = RoIConfig(),
        box: BoxHeadConfig = BoxHeadConfig(),
        loss: LossConfig = LossConfig(),
        post: PostprocessConfig = PostprocessConfig(),
        pretrained: str | Path | None = None,
        norm_eval: bool | None = None,
    ) -> None:
        super().__init__()
        norm_eval = pretrained is not None if norm_eval is None else bool(norm_eval)
        self.num_classes, self.strides, self.width = num_classes, tuple(strides), fpn_channels
        self.box, self.decoder_config = box, decoder
        self.set_postprocess(post)
        self.stages_count, self.parallel_heads, self.groups = decoder.stages, decoder.parallel_heads, queries.groups
        self.backbone = TimmBackbone(backbone, pretrained=pretrained, norm_eval=norm_eval, strides=self.strides)
        self.fpn = PyramidFPN(self.backbone.channels, fpn_channels)
        self.query_source: QuerySource = create_query_source(
            queries.query_source, queries.num_queries, fpn_channels, queries.groups, self.strides, queries.query_source_params
        )
        self.proposal = ProposalBlock(
            fpn_channels, fpn_channels, num_classes, self.strides, num_heads=decoder.num_heads, ffn_dim=decoder.ffn_dim,
            roi_size=roi.roi_size, roi_canonical=roi.roi_canonical,
        )
        sizes = {f: getattr(decoder, f) for f in ("dynamic_dim", "sampling_groups", "sampling_points", "mixing_out_points")}

        def stage() -> nn.Module:
            return create_stage(
                decoder.decoder, dim=fpn_channels, feat_channels=fpn_channels, num_classes=num_classes, strides=self.strides,
                num_heads=decoder.num_heads, ffn_dim=decoder.ffn_dim, roi=roi, box=box, box_pe=decoder.box_pe, params=sizes,
            )

        self.stages = nn.ModuleList(stage() for _ in range(decoder.stages - 1))
        self.heads = nn.ModuleList(stage() for _ in range(decoder.parallel_heads))  # the last stage, in parallel copies
        self.head_embed = nn.Parameter(torch.zeros(decoder.parallel_heads, fpn_channels)) if decoder.parallel_heads > 1 else None
        self.criterion = build_criterion(loss)
        self.resolved_params = {"norm_eval": norm_eval}
        groups = (queries, decoder, roi, box, loss, post)
        flat = {k: v for g in groups for k, v in dataclasses.asdict(g).items()}
        # The flat parameters build_sparse_detector takes (create_student stamps the registered name).
        self.config: dict = {"name": "sparse", "params": {
            "backbone": backbone, "num_classes": num_classes, "strides": list(strides), "fpn_channels": fpn_channels, **flat,
            "pretrained": None if pretrained is None else str(pretrained), "norm_eval": norm_eval,
        }}

    # -------------------------------------------------------------------------------- contract
    def set_query_source(self, source: QuerySource) -> None:
        """Replace the query source by a module (experiments; ``config`` does not record it, prefer
        the ``query_source`` parameter for anything that is checkpointed)."""
        self.query_source = check_query_source(source, type(source).__name__)

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
            _, pred = self.heads[k](features, boxes, self._head_content(q, k), queries.valid, queries.groups, image_sizes)
            aux.append(pred)
        main = aux.pop()
        crossing = QueryCrossing.first_group(q, boxes, queries.valid, queries.groups) if self.training else None
        return SparsePredictions(main.logits, main.boxes, main.valid, main.bins, aux if keep_aux else [], queries, crossing)

    def finish_from_crossing(self, context: list[Tensor], image_sizes: Tensor, content: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """The main head (the last parallel copy) on content (B, Q, D) and boxes (B, Q, 4), RoIs from ``context`` (FPN maps)."""
        main = self.parallel_heads - 1
        return self.heads[main](context, boxes, self._head_content(content, main), valid, None, image_sizes)[1]

    def _head_content(self, q: Tensor, k: int) -> Tensor:
        """The content parallel head copy ``k`` reads: the shared q plus that copy's embedding."""
        return q if self.head_embed is None else q + self.head_embed[k]

    def aux_names(self, count: int) -> list[str]:
        """Loss-key suffixes of ``predictions.aux``: "prop", then "stage{i}" / "head{k}"."""
        names = ["prop"] + [f"stage{i}" for i in range(len(self.stages))] + [f"head{k}" for k in range(self.parallel_heads - 1)]
        return names[:count]


# ------------------------------------------------------------------------------ flat builder
def build_sparse_detector(
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
    decoder: str = "dynamic",
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
) -> SparseDetector:
    """A :class:`SparseDetector` from flat options (what recipes and checkpoints hold).

    Besides the groups' fields: ``decoder`` "dynamic" | "adamixer" (ASAG-A: ``sampling_groups`` x
    ``sampling_points`` points per query, mixed to ``mixing_out_points``); ``box_pe`` the sine box
    embedding in the decoder self-attention (DAB-style); ``query_weighting`` ASAG's Query Weighting
    (spec §6: on for one-layer heads, off for deep decoders); ``area_weight`` the official code's A.
    """
    params = dict(locals())
    raise_failed(check_sparse_params(params), "sparse detector")
    model = SparseDetector(
        backbone, num_classes, tuple(strides), fpn_channels,
        queries=pick(QueryConfig, params), decoder=pick(DecoderConfig, params), roi=pick(RoIConfig, params),
        box=pick(BoxHeadConfig, params), loss=pick(LossConfig, params), post=pick(PostprocessConfig, params),
        pretrained=pretrained, norm_eval=norm_eval,
    )
    return model


def check_sparse_params(p: dict[str, Any]) -> list[ParamCheck]:
    """Every check of the RoI detectors' parameters (types come from the signature)."""
    rows = common_checks(p) + roi_checks(p)
    rows += [
        ParamCheck("stages", p["stages"], isinstance(p["stages"], int) and p["stages"] >= 1, "an integer >= 1"),
        ParamCheck("parallel_heads", p["parallel_heads"], isinstance(p["parallel_heads"], int) and p["parallel_heads"] >= 1, "an integer >= 1"),
        ParamCheck("decoder", p["decoder"], p["decoder"] in list_stages(), f"one of {', '.join(map(repr, list_stages()))}"),
        ParamCheck("dynamic_dim", p["dynamic_dim"], isinstance(p["dynamic_dim"], int) and p["dynamic_dim"] >= 1, "an integer >= 1"),
        ParamCheck("sampling_points", p["sampling_points"], isinstance(p["sampling_points"], int) and p["sampling_points"] >= 1, "an integer >= 1"),
        ParamCheck("mixing_out_points", p["mixing_out_points"], isinstance(p["mixing_out_points"], int) and p["mixing_out_points"] >= 1, "an integer >= 1"),
    ]
    groups_ok = isinstance(p["sampling_groups"], int) and p["sampling_groups"] >= 1
    rows.append(ParamCheck("sampling_groups", p["sampling_groups"], groups_ok, "an integer >= 1"))
    if groups_ok and isinstance(p["fpn_channels"], int) and p["decoder"] == "adamixer":
        rows.append(ParamCheck("sampling_groups", p["sampling_groups"], p["fpn_channels"] % p["sampling_groups"] == 0,
                               f"a divisor of fpn_channels = {p['fpn_channels']}"))
    return rows


build_sparse_detector.check_params = check_sparse_params

