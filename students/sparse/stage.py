"""The RoI decoder stage every RoI-based sparse detector stacks, and the registry of its interactions.

``RoIStage.forward(features, boxes, q, valid, groups, image_sizes) -> (q', Predictions)``:

1. self-attention over the queries (optional box positional term, optional IoF bias), padded keys
   and other query groups masked;
2. query-feature interaction :meth:`RoIStage.mix` (the subclass: Sparse R-CNN's DynamicConv on RoI
   features, ASAG-A's adaptive sampling + mixing); residual + LN;
3. FFN + LN;
4. heads: class logits (prior 0.01) and either Sparse R-CNN deltas (``box_head="delta"``, weights
   2, 2, 1, 1) or per-edge bin logits (``box_head="bins"``, :func:`~students.sparse.heads.bins_predictions`).

``boxes`` are the stage's input boxes; callers pass them detached (no gradient through the box
chain between stages). Stages are registered by name (:func:`register_stage`): the detector's
``decoder`` parameter picks one, so a checkpoint rebuilds it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from distill.errors import ConfigError
from distill.structures import Predictions
from students.sparse.box_ops import apply_deltas
from students.sparse.config import BoxHeadConfig, RoIConfig
from students.sparse.heads import bins_predictions, init_bins_bias, init_class_bias
from students.sparse.layers import FFN, MaskedSelfAttention, box_sine_embedding, mlp_head

__all__ = ["RoIStage", "register_stage", "create_stage", "list_stages"]


class RoIStage(nn.Module):
    """One decoder layer with its heads; subclasses pass ``interact`` (a factory of the interaction
    module, ``self.interact``) and define :meth:`mix`."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        strides: Sequence[int],
        num_heads: int = 8,
        ffn_dim: int = 2048,
        roi: RoIConfig = RoIConfig(),
        box: BoxHeadConfig = BoxHeadConfig(),
        box_pe: bool = False,
        iof_bias: bool = False,
        interact: Callable[[], nn.Module] | None = None,
        cls_layers: int = 1,
        reg_layers: int = 3,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides, self.roi_size, self.roi_canonical = tuple(strides), roi.roi_size, roi.roi_canonical
        self.box_head, self.num_bins, self.bin_fraction = box.box_head, box.num_bins, box.bin_fraction
        self.num_heads = num_heads
        self.self_attn = MaskedSelfAttention(dim, num_heads, iof_bias=iof_bias)
        self.pos = nn.Linear(dim, dim) if box_pe else None
        # built here, between the attention and the norms, so that a seed initialises every layer as before the
        # stages shared this class (the same random draws in the same order)
        self.interact = interact() if interact is not None else None
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)
        self.cls_tower, self.reg_tower = mlp_head(dim, cls_layers, bias=False), mlp_head(dim, reg_layers)
        self.cls_out = nn.Linear(dim, num_classes)
        init_class_bias(self.cls_out, prior_prob)
        self.reg_out = nn.Linear(dim, 4 * box.num_bins if box.box_head == "bins" else 4)
        if box.box_head == "bins":
            init_bins_bias(self.reg_out, box.num_bins, box.bin_fraction)
        else:
            nn.init.zeros_(self.reg_out.weight)
            nn.init.zeros_(self.reg_out.bias)

    def forward(
        self, features: list[Tensor], boxes: Tensor, q: Tensor, valid: Tensor, groups: Tensor | None, image_sizes: Tensor
    ) -> tuple[Tensor, Predictions]:
        """features: FPN maps; boxes (B, Q, 4) xyxy px (detached); q (B, Q, D); valid (B, Q); groups (Q,) | None."""
        pos = self.pos(box_sine_embedding(boxes, image_sizes, q.shape[-1])) if self.pos is not None else None
        q = self.self_attn(q, valid, groups, pos, boxes)
        q = self.norm(q + self.mix(features, boxes, q, image_sizes))
        q = self.ffn(q)
        return q, self.predict(q, boxes, valid)

    def mix(self, features: list[Tensor], boxes: Tensor, q: Tensor, image_sizes: Tensor) -> Tensor:
        """Query-feature interaction (B, Q, D)."""
        raise NotImplementedError

    def predict(self, q: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """Class logits and refined boxes (deltas or bins) of queries q (B, Q, D) on their input boxes."""
        logits = self.cls_out(self.cls_tower(q))  # (B, Q, C)
        reg = self.reg_out(self.reg_tower(q))
        if self.box_head == "delta":
            return Predictions(logits, apply_deltas(boxes, reg), valid)
        bins, decoded = bins_predictions(reg, boxes, self.bin_fraction)
        return Predictions(logits, decoded, valid, bins=bins)


# ------------------------------------------------------------------------------ stage registry
StageFactory = Callable[..., RoIStage]
_STAGES: dict[str, StageFactory] = {}


def register_stage(name: str) -> Callable[[StageFactory], StageFactory]:
    """Register a stage factory ``factory(dim, feat_channels, num_classes, strides, *, num_heads, ffn_dim,
    roi, box, box_pe, params) -> RoIStage`` under ``name`` (the detector's ``decoder`` parameter);
    ``params`` is the detector's flat parameter mapping, from which the stage reads its own sizes."""

    def wrap(fn: StageFactory) -> StageFactory:
        if name in _STAGES and _STAGES[name] is not fn:
            raise ValueError(f"decoder stage {name!r} is already registered")
        _STAGES[name] = fn
        return fn

    return wrap


def list_stages() -> list[str]:
    return sorted(_STAGES)


def create_stage(name: str, **kwargs: Any) -> RoIStage:
    if name not in _STAGES:
        raise ConfigError(f"unknown decoder {name!r}; known: {', '.join(list_stages())}")
    return _STAGES[name](**kwargs)
