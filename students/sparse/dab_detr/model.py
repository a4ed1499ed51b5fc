"""DAB-DETR on any timm backbone, with Group DETR, as a detector of the sparse family.

Pipeline (``features`` then ``head``)::

    images -> TimmBackbone (C_l at ``strides``) -> InputProjection (1x1 conv + GN to ``hidden_dim``)
           -> flattened tokens + sine positions (temperature 20) + level embedding
           -> ``encoder_layers`` transformer encoder layers (0 allowed)
           -> learned anchors (``num_queries`` x ``groups``, pre-sigmoid; content zero)
           -> DABDecoder (``decoder_layers`` layers, anchors refined and detached per layer)

Training returns the last layer as the main head and the earlier layers in ``aux`` (each with its
own Hungarian matching and focal / L1 / GIoU [/ DFL] loss, the family's ``SetCriterion``), every
group of queries; inference runs group 0 and returns the last layer only. ``decode_queries`` runs
the decoder from given boxes (KD-DETR's shared queries, the teacher cache's query rows).
See ``encoder.py`` for why multi-scale tokens and a light encoder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.structures import Predictions, Target
from students.backbone import TimmBackbone
from students.registry import ParamCheck, finite, raise_failed
from students.sparse.config import BoxHeadConfig, LossConfig, PostprocessConfig, common_checks, pick
from students.sparse.dab_detr.decoder import DABDecoder
from students.sparse.dab_detr.embedding import anchors_to_pixels, flatten_memory, pixels_to_anchors
from students.sparse.dab_detr.encoder import EncoderLayer, InputProjection
from students.sparse.detector import QueryCrossing, QueryDetector, SparsePredictions, build_criterion
from students.sparse.queries import LearnedAnchors, Queries

__all__ = ["DABDETR", "build_dab_detr", "check_dab_params"]


class ProjectedMaps(list):
    """``features``' projected maps (a list of (B, D, H_l, W_l) tensors) that keep their encoded tokens
    once ``memory`` has computed them: the head and ``decode_queries`` of one step (shared queries,
    KD-DETR's random points on a teacher) then run the encoder once. The tokens live as long as the
    maps, i.e. one step; other image sizes are encoded anew."""

    encoded: tuple[Tensor, Tensor, Tensor] | None = None
    encoded_sizes: Tensor | None = None


class DABDETR(QueryDetector):
    """DAB-DETR (see the module docstring). ``hidden_dim`` is the token / query width D."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 80,
        strides: tuple[int, ...] = (8, 16, 32),
        hidden_dim: int = 256,
        *,
        num_queries: int = 100,
        groups: int = 1,
        decoder_layers: int = 6,
        encoder_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        modulate_hw: bool = True,
        anchor_size: float = 0.25,
        box: BoxHeadConfig = BoxHeadConfig(),
        loss: LossConfig = LossConfig(query_weighting=False),
        post: PostprocessConfig = PostprocessConfig(),
        pretrained: str | Path | None = None,
        norm_eval: bool | None = None,
    ) -> None:
        super().__init__()
        norm_eval = pretrained is not None if norm_eval is None else bool(norm_eval)
        self.num_classes, self.strides, self.width, self.box, self.groups = num_classes, tuple(strides), hidden_dim, box, groups
        self.set_postprocess(post)
        self.backbone = TimmBackbone(backbone, pretrained=pretrained, norm_eval=norm_eval, strides=self.strides)
        self.input_proj = InputProjection(self.backbone.channels, hidden_dim)
        self.level_embed = nn.Parameter(torch.randn(len(self.strides), hidden_dim)) if len(self.strides) > 1 else None
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim) for _ in range(encoder_layers))
        self.query_source = LearnedAnchors(num_queries, hidden_dim, groups, anchor_size, content=False)
        self.decoder = DABDecoder(hidden_dim, num_classes, decoder_layers, num_heads, ffn_dim, box, modulate_hw)
        self.criterion = build_criterion(loss)
        self.resolved_params = {"norm_eval": norm_eval}
        flat = {k: v for g in (box, loss, post) for k, v in dataclasses.asdict(g).items()}
        # The flat parameters build_dab_detr takes (create_student stamps the registered name).
        self.config: dict = {"name": "dab_detr", "params": {
            "backbone": backbone, "num_classes": num_classes, "strides": list(strides), "hidden_dim": hidden_dim,
            "num_queries": num_queries, "groups": groups, "decoder_layers": decoder_layers, "encoder_layers": encoder_layers,
            "num_heads": num_heads, "ffn_dim": ffn_dim, "modulate_hw": modulate_hw, "anchor_size": anchor_size, **flat,
            "pretrained": None if pretrained is None else str(pretrained), "norm_eval": norm_eval,
        }}

    # -------------------------------------------------------------------------------- contract
    def features(self, images: Tensor) -> ProjectedMaps:
        """images (B, 3, H, W) -> projected maps at ``strides``, each (B, hidden_dim, ceil(H / s), ceil(W / s))."""
        return ProjectedMaps(self.input_proj(self.backbone(images)))

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets: list[Target] | None = None) -> SparsePredictions:
        """Encoder + decoder from the learned anchors. Training: every layer (aux) and group; eval: last layer, group 0."""
        image_sizes = self._sizes(features, image_sizes)
        return self._decode(features, self.query_source(features, image_sizes), image_sizes)

    def decode_queries(
        self, features: list[Tensor], image_sizes: Tensor | None, boxes: Tensor, valid: Tensor, aux: bool = True
    ) -> SparsePredictions:
        """The decoder from given boxes (B, K, 4) xyxy px, valid (B, K): query k of the result starts
        from box k (zero content), in its own pass, so the detector's own queries never see it."""
        return self._decode(features, Queries(boxes, valid), self._sizes(features, image_sizes), aux)

    def memory(self, features: list[Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoded tokens (B, N, D), their positions (B, N, D) and padding (B, N); computed once per
        :class:`ProjectedMaps` and image sizes."""
        maps = features if isinstance(features, ProjectedMaps) else None  # plain lists (cached maps, callers' own) keep nothing
        if maps is not None and maps.encoded is not None and torch.equal(maps.encoded_sizes, image_sizes):
            return maps.encoded
        memory, position, padding = flatten_memory(features, self.strides, image_sizes, self.level_embed)
        for layer in self.encoder:
            memory = layer(memory, position, padding)
        if maps is not None:
            maps.encoded, maps.encoded_sizes = (memory, position, padding), image_sizes
        return memory, position, padding

    def _decode(self, features: list[Tensor], queries: Queries, image_sizes: Tensor, aux_heads: bool = True) -> SparsePredictions:
        memory, position, padding = self.memory(features, image_sizes)
        anchors = pixels_to_anchors(queries.boxes, image_sizes)
        layers, inputs, contents = self.decoder(anchors, queries.valid, queries.groups, memory, position, padding, image_sizes)
        main = layers[-1]
        aux = layers[:-1] if self.training and aux_heads else []
        crossing = None
        if self.training:
            crossing = QueryCrossing.first_group(contents[-1], anchors_to_pixels(inputs[-1], image_sizes), queries.valid, queries.groups)
        return SparsePredictions(main.logits, main.boxes, main.valid, main.bins, aux, queries, crossing)

    @property
    def crossable(self) -> bool:
        """A one-layer decoder's content entering its (last) layer is the constant zero: nothing to cross."""
        return len(self.decoder.layers) > 1

    def crossing_context(self, features: list[Tensor], image_sizes: Tensor) -> list[Tensor]:
        """The encoded tokens, their positions and padding (:meth:`memory`)."""
        return list(self.memory(features, image_sizes))

    def finish_from_crossing(self, context: list[Tensor], image_sizes: Tensor, content: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """The last decoder layer and heads on content (B, Q, D) at boxes (B, Q, 4) xyxy px, over the memory in ``context``."""
        memory, position, padding = context
        anchors = pixels_to_anchors(boxes, image_sizes)
        return self.decoder.step(len(self.decoder.layers) - 1, anchors, content, valid, None, memory, position, padding, image_sizes)[1]

    def aux_names(self, count: int) -> list[str]:
        """Loss-key suffixes of ``predictions.aux``: "layer0", "layer1", ... (the earlier decoder layers)."""
        return [f"layer{i}" for i in range(count)]


# ------------------------------------------------------------------------------ flat builder
def build_dab_detr(
    backbone: str = "resnet50",
    num_classes: int = 80,
    strides: tuple[int, ...] = (8, 16, 32),
    hidden_dim: int = 256,
    num_queries: int = 100,
    groups: int = 1,
    decoder_layers: int = 6,
    encoder_layers: int = 1,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    modulate_hw: bool = True,
    anchor_size: float = 0.25,
    box_head: Literal["delta", "bins"] = "delta",
    num_bins: int = 17,
    bin_fraction: float = 0.125,
    query_weighting: bool = False,
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
) -> DABDETR:
    """A :class:`DABDETR` from flat options (what recipes and checkpoints hold).

    ``decoder_layers`` 1..6 (one and six layers share every part); ``encoder_layers`` >= 0;
    ``groups`` Group DETR's K (training only); ``modulate_hw`` the width / height modulated
    attention; ``anchor_size`` the learned anchors' initial side (fraction of the image);
    ``box_head`` "delta" (DAB-DETR's inverse-sigmoid update) or "bins" (LD-ready); loss options as
    the family's (``query_weighting`` off: it is meant for one-layer heads, spec §6).
    """
    params = dict(locals())
    raise_failed(check_dab_params(params), "dab_detr")
    model = DABDETR(
        backbone, num_classes, tuple(strides), hidden_dim,
        num_queries=num_queries, groups=groups, decoder_layers=decoder_layers, encoder_layers=encoder_layers,
        num_heads=num_heads, ffn_dim=ffn_dim, modulate_hw=modulate_hw, anchor_size=anchor_size,
        box=pick(BoxHeadConfig, params), loss=pick(LossConfig, params), post=pick(PostprocessConfig, params),
        pretrained=pretrained, norm_eval=norm_eval,
    )
    return model


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dab_params(p: dict[str, Any]) -> list[ParamCheck]:
    """Every check of DAB-DETR's parameters (types come from the signature)."""
    rows = common_checks(p, width_key="hidden_dim")
    rows += [
        ParamCheck("decoder_layers", p["decoder_layers"], _int(p["decoder_layers"]) and p["decoder_layers"] >= 1, "an integer >= 1"),
        ParamCheck("encoder_layers", p["encoder_layers"], _int(p["encoder_layers"]) and p["encoder_layers"] >= 0, "an integer >= 0"),
        ParamCheck("anchor_size", p["anchor_size"], finite(p["anchor_size"]) and 0 < p["anchor_size"] < 1, "in (0, 1)"),
    ]
    return rows


build_dab_detr.check_params = check_dab_params
