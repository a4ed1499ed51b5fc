"""DAB-DETR's decoder: dynamic anchor boxes refined layer by layer (Liu et al., ICLR 2022).

Every query is an anchor box ``a = (x, y, w, h)`` (image-normalised, in (0, 1)) plus a content
vector (zero at the start). Layer l, for queries (B, Q):

1. ``sine = sine_embedding(a)`` (D / 2 dims per coordinate, temperature 10000): (B, Q, 2D);
   ``query_pos = MLP(sine)`` (2D -> D -> D), the positional query of self-attention;
2. self-attention over ``content + query_pos`` (padded keys and other query groups masked:
   Group DETR's groups never see each other);
3. the cross-attention positional query: the (x, y) half of ``sine``, times ``MLP(content)`` from
   the second layer on (Conditional DETR's conditional spatial query; identity at layer 0), then
   width / height modulated by ``(w_ref, h_ref) = sigmoid(MLP(content))``
   (:func:`~students.sparse.dab_detr.attention.modulate_position`); Conditional-DETR
   cross-attention over the image tokens (:class:`~students.sparse.dab_detr.attention.ConditionalCrossAttention`);
4. FFN; LayerNorm; class head and box head on the normalised content.

Box heads: ``"delta"`` (DAB-DETR) predicts ``delta`` and ``a' = sigmoid(inverse_sigmoid(a) + delta)``;
``"bins"`` predicts per-edge distributions on the anchor (``students.sparse.heads``), whose
integral is ``a'`` (so LD / DFL reach a DAB-DETR). Either way the undetached ``a'`` is the layer's
prediction (its loss trains the layer) and ``a'.detach()`` is the next layer's anchor: no gradient
runs down the box chain (DAB-DETR's "detached iterative update"). The learned anchors of layer 0
are not detached, so they learn from the first layer's loss.

One difference from the reference code: there, the box that becomes the next anchor is computed
from the layer's raw output while the box in the loss comes from the LayerNorm-ed output, so the
supervised box is not the one passed on; here both are the same box. The heads and the three
MLPs are shared by all layers (the reference default), so a one-layer and a six-layer decoder
have the same parts.
"""
from __future__ import annotations

from torch import Tensor, nn

from distill.structures import Predictions
from students.sparse.config import BoxHeadConfig
from students.sparse.dab_detr.attention import ConditionalCrossAttention, modulate_position
from students.sparse.dab_detr.embedding import anchors_to_pixels, pixels_to_anchors, refine_anchors
from students.sparse.heads import bins_predictions, init_bins_bias, init_class_bias
from students.sparse.layers import FFN, MLP, MaskedSelfAttention, sine_embedding

__all__ = ["DABDecoderLayer", "DABDecoder", "QUERY_PE_TEMPERATURE"]

QUERY_PE_TEMPERATURE = 10000.0  # the anchors' own sine embedding (the image side uses 20)


class DABDecoderLayer(nn.Module):
    """Self-attention, conditional cross-attention, FFN (post-norm, dropout 0). Shapes in :meth:`forward`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, first: bool) -> None:
        super().__init__()
        self.self_attn = MaskedSelfAttention(dim, num_heads)
        self.cross_attn = ConditionalCrossAttention(dim, num_heads, first)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, sine_xy: Tensor, valid: Tensor, groups: Tensor | None,
        memory: Tensor, memory_pos: Tensor, padding: Tensor,
    ) -> Tensor:
        """tgt, query_pos, sine_xy (B, Q, D); valid (B, Q); groups (Q,) | None; memory, memory_pos (B, N, D);
        padding (B, N) True at padding tokens -> (B, Q, D)."""
        tgt = self.self_attn(tgt, valid, groups, query_pos)
        tgt = self.norm(tgt + self.cross_attn(tgt, query_pos, sine_xy, memory, memory_pos, padding))
        return self.ffn(tgt)


class DABDecoder(nn.Module):
    """``layers`` DAB-DETR layers with shared heads (see the module docstring).

    ``forward(anchors (B, Q, 4), valid (B, Q), groups, memory, memory_pos, padding, image_sizes)
    -> (predictions per layer, anchors each layer started from, content each layer read (B, Q, D))``;
    boxes are xyxy input pixels. :meth:`step` runs one layer (the forward's loop body; CrossKD finishes
    a decoder with its last layer on another decoder's state).
    """

    def __init__(
        self, dim: int, num_classes: int, layers: int, num_heads: int = 8, ffn_dim: int = 2048,
        box: BoxHeadConfig = BoxHeadConfig(), modulate_hw: bool = True, prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.dim, self.box = dim, box
        self.layers = nn.ModuleList(DABDecoderLayer(dim, num_heads, ffn_dim, first=i == 0) for i in range(layers))
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.query_scale = MLP(dim, dim, dim, 2) if layers > 1 else None  # read from the second layer on
        self.ref_anchor_head = MLP(dim, dim, 2, 2) if modulate_hw else None
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes)
        init_class_bias(self.class_head, prior_prob)
        self.box_head = MLP(dim, dim, 4 * box.num_bins if box.box_head == "bins" else 4, 3)
        if box.box_head == "bins":
            init_bins_bias(self.box_head.last, box.num_bins, box.bin_fraction)
        else:  # start from the anchors themselves
            nn.init.zeros_(self.box_head.last.weight)
            nn.init.zeros_(self.box_head.last.bias)

    def positional_queries(self, anchors: Tensor, tgt: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """anchors (B, Q, 4), content tgt (B, Q, D) -> (query_pos (B, Q, D), modulated sine_xy (B, Q, D))."""
        sine = sine_embedding(anchors, self.dim // 2, QUERY_PE_TEMPERATURE).to(tgt.dtype)  # (B, Q, 2D): x, y, w, h
        query_pos = self.ref_point_head(sine)
        sine_xy = sine[..., : self.dim]
        if layer > 0:
            sine_xy = sine_xy * self.query_scale(tgt)
        if self.ref_anchor_head is not None:
            sine_xy = modulate_position(sine_xy, self.ref_anchor_head(tgt).sigmoid(), anchors[..., 2:])
        return query_pos, sine_xy

    def forward(
        self, anchors: Tensor, valid: Tensor, groups: Tensor | None, memory: Tensor, memory_pos: Tensor, padding: Tensor,
        image_sizes: Tensor,
    ) -> tuple[list[Predictions], list[Tensor], list[Tensor]]:
        tgt = memory.new_zeros(anchors.shape[0], anchors.shape[1], self.dim)  # content starts at zero
        predictions, inputs, contents = [], [], []
        for index in range(len(self.layers)):
            inputs.append(anchors)
            contents.append(tgt)
            tgt, prediction, refined = self.step(index, anchors, tgt, valid, groups, memory, memory_pos, padding, image_sizes)
            predictions.append(prediction)
            anchors = refined.detach()  # the next layer starts from this box, without its gradient
        return predictions, inputs, contents

    def step(
        self, index: int, anchors: Tensor, tgt: Tensor, valid: Tensor, groups: Tensor | None, memory: Tensor, memory_pos: Tensor,
        padding: Tensor, image_sizes: Tensor,
    ) -> tuple[Tensor, Predictions, Tensor]:
        """Layer ``index`` on anchors (B, Q, 4) normalised cxcywh and content tgt (B, Q, D) ->
        (its content (B, Q, D), its Predictions, the refined anchors, not detached)."""
        query_pos, sine_xy = self.positional_queries(anchors, tgt, index)
        tgt = self.layers[index](tgt, query_pos, sine_xy, valid, groups, memory, memory_pos, padding)
        prediction, refined = self.predict(self.norm(tgt), anchors, valid, image_sizes)
        return tgt, prediction, refined

    def predict(self, h: Tensor, anchors: Tensor, valid: Tensor, image_sizes: Tensor) -> tuple[Predictions, Tensor]:
        """Normalised content h (B, Q, D) on its anchors -> (Predictions with xyxy px boxes, refined anchors (B, Q, 4))."""
        logits = self.class_head(h)
        reg = self.box_head(h)
        if self.box.box_head == "delta":
            refined = refine_anchors(anchors, reg)
            return Predictions(logits, anchors_to_pixels(refined, image_sizes), valid), refined
        bins, boxes = bins_predictions(reg, anchors_to_pixels(anchors, image_sizes), self.box.bin_fraction)
        return Predictions(logits, boxes, valid, bins=bins), pixels_to_anchors(boxes, image_sizes)
