"""Building blocks shared by the proposal block and the decoder stages.

- :class:`PyramidFPN`: top-down FPN without extra levels (the P2-P5 / P3-P5 maps RoIAlign reads).
- :func:`roi_features`: multi-level RoIAlign with the FPN level rule of Lin et al.
- :func:`sine_embedding`, :func:`box_sine_embedding`: sinusoidal embeddings of values in [0, 1] / of boxes.
- :func:`attention_mask`: additive self-attention mask = per-head bias + key padding + query groups.
- :class:`MaskedSelfAttention`: MHSA + residual + LayerNorm with such a mask (optional IoF bias;
  query groups folded into the batch).
- :func:`mlp_head`: ``n x [Linear - LayerNorm - ReLU]`` towers of the class and box heads.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from distill.ops.precision import compute_dtype
from students.common.fpn import top_down, xavier_convs
from students.sparse.box_ops import xyxy_to_cxcywh

__all__ = [
    "PyramidFPN", "roi_features", "sine_embedding", "box_sine_embedding", "attention_mask", "iof_matrix", "contiguous_groups",
    "fold_groups", "unfold_groups", "MaskedSelfAttention", "mlp_head", "FFN", "MLP",
]


class PyramidFPN(nn.Module):
    """Top-down FPN: 1x1 laterals, nearest-upsampled sums, 3x3 outputs; one output per input level.

    ``forward([C_a, ..., C_b]) -> [P_a, ..., P_b]``, each (B, out_channels, H_l, W_l). Unlike the GFL
    FPN it has no P6 / P7: every parameter is used by RoIAlign.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        xavier_convs(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return top_down(self.lateral, self.output, feats)


def roi_features(
    features: list[Tensor],
    strides: Sequence[int],
    boxes: Tensor,
    output_size: int = 7,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    sampling_ratio: int = 2,
) -> Tensor:
    """RoIAlign of every box on its FPN level.

    features: maps of strides ``strides`` (B, C, H_l, W_l); boxes (B, Q, 4) xyxy input pixels.
    A box of side ``s = sqrt(w h)`` reads level ``floor(canonical_level + log2(s / canonical_size))``
    (as a power of two of the stride), clamped to the levels given. Small inputs want a smaller
    ``canonical_size`` so that their boxes spread over the levels.
    Returns (B * Q, C, output_size, output_size), batch-major.
    """
    batch, num = boxes.shape[:2]
    flat = boxes.reshape(-1, 4).to(compute_dtype())
    image = torch.arange(batch, device=boxes.device).repeat_interleave(num)
    rois = torch.cat([image[:, None].to(flat.dtype), flat], dim=1)  # (B*Q, 5)
    logs = [int(round(math.log2(s))) for s in strides]
    side = xyxy_to_cxcywh(flat)[:, 2:].clamp(min=1e-3).prod(dim=1).sqrt()
    level = torch.floor(canonical_level + torch.log2(side / canonical_size)).clamp(min(logs), max(logs))
    out = flat.new_zeros(batch * num, features[0].shape[1], output_size, output_size).to(features[0].dtype)
    unused = []
    for feat, stride, lg in zip(features, strides, logs):
        index = (level == lg).nonzero(as_tuple=True)[0]
        # Traced (ONNX export): every level stays in the graph, the branch would freeze to the example's.
        if len(index) or torch.jit.is_tracing():
            out[index] = roi_align(feat, rois[index].to(feat.dtype), output_size, 1.0 / stride, sampling_ratio, aligned=True)
        else:
            unused.append(feat)
    # A level no box reads still joins the graph with a zero gradient (DDP's unused-parameter check).
    return out + sum(f.sum() * 0 for f in unused) if unused else out


def sine_embedding(values: Tensor, dims: int, temperature: float = 10000.0) -> Tensor:
    """values (..., k) in [0, 1] units -> (..., k * dims): per value ``[sin(a_0..a_{n-1}), cos(a_0..a_{n-1})]``.

    ``a_i = 2 pi v / temperature^(2 i / dims)``, ``n = dims / 2`` frequencies (the Transformer /
    DETR sine code; sines and cosines of one value as two blocks instead of interleaved, a
    permutation every consumer's following Linear absorbs). ``dims`` must be even.
    """
    if dims % 2:
        raise ValueError(f"sine embedding needs an even number of dims per value, got {dims}")
    values = values.to(compute_dtype())
    freq = temperature ** (2 * torch.arange(dims // 2, device=values.device, dtype=values.dtype) / dims)
    angles = values[..., None] * (2 * math.pi) / freq  # (..., k, n)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def box_sine_embedding(boxes: Tensor, image_sizes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """boxes (B, Q, 4) xyxy px, image_sizes (B, 2) -> (B, Q, dim): :func:`sine_embedding` of (cx, cy, w, h) / (W, H, W, H)."""
    if dim % 8:
        raise ValueError(f"box embedding dim must be a multiple of 8, got {dim}")
    h, w = image_sizes[:, 0].to(compute_dtype()), image_sizes[:, 1].to(compute_dtype())
    norm = xyxy_to_cxcywh(boxes.to(compute_dtype())) / torch.stack([w, h, w, h], dim=-1)[:, None, :]  # (B, Q, 4)
    return sine_embedding(norm, dim // 4, temperature)


def iof_matrix(boxes: Tensor) -> Tensor:
    """boxes (B, Q, 4) -> (B, Q, Q) intersection over the *query's* area: |b_i & b_j| / |b_i|."""
    lt = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / area[:, :, None].clamp(min=1e-6)


def attention_mask(valid: Tensor, groups: Tensor | None, num_heads: int, bias: Tensor | None = None) -> Tensor:
    """Additive mask (B * heads, Q, Q) for ``nn.MultiheadAttention``.

    valid (B, Q) bool: invalid keys get -inf; groups (Q,) int64: keys of another group get -inf
    (Group DETR's block-diagonal self-attention); bias (B, heads, Q, Q) is added. Every query may
    always attend to itself, so no row is all -inf (padded queries give finite, unused outputs).
    """
    batch, num = valid.shape
    allowed = valid[:, None, :].expand(batch, num, num)
    if groups is not None:
        allowed = allowed & (groups[:, None] == groups[None, :])[None]
    # A float identity compared, not a bool eye: onnxruntime has no boolean EyeLike (ONNX export).
    allowed = allowed | (torch.eye(num, device=valid.device) > 0)[None]
    mask = torch.zeros(batch, num_heads, num, num, device=valid.device)
    if bias is not None:
        mask = mask + bias
    mask = mask.masked_fill(~allowed[:, None], float("-inf"))
    return mask.flatten(0, 1)


def contiguous_groups(groups: Tensor | None) -> int | None:
    """K when ``groups`` (Q,) is ``[0]*N + [1]*N + ... + [K-1]*N`` (the layout of learned groups), else None."""
    if groups is None:
        return 1
    count = int(groups.max()) + 1
    if groups.numel() % count:
        return None
    expected = torch.arange(count, device=groups.device).repeat_interleave(groups.numel() // count)
    return count if torch.equal(groups, expected) else None


def fold_groups(t: Tensor | None, count: int) -> Tensor | None:
    """(B, K * N, ...) -> (B * K, N, ...): each group becomes its own batch row."""
    return None if t is None else t.reshape(t.shape[0] * count, t.shape[1] // count, *t.shape[2:])


def unfold_groups(t: Tensor, count: int) -> Tensor:
    """(B * K, N, ...) -> (B, K * N, ...), the inverse of :func:`fold_groups`."""
    return t.reshape(t.shape[0] // count, t.shape[1] * count, *t.shape[2:])


class MaskedSelfAttention(nn.Module):
    """``LN(x + MHSA(x + pos, x + pos, x))`` over valid keys of the same query group (dropout 0).

    ``forward(x (B, Q, D), valid (B, Q), groups (Q,) | None, pos (B, Q, D) | None, boxes (B, Q, 4) | None)``.
    With ``iof_bias`` each head h adds ``tau_h log(IoF(b_i, b_j) + 1e-7)`` (``tau_h`` learned, init
    U(0, 4); spec §3.3), which needs ``boxes``. ``residual_with_pos``: values and residual are
    ``x + pos`` (the proposal block) instead of ``x``. Groups in the learned layout are folded into
    the batch (memory O(K N^2), not O((K N)^2)); any other layout uses a block-diagonal mask.
    """

    def __init__(self, dim: int, num_heads: int, iof_bias: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.num_heads = num_heads
        self.tau = nn.Parameter(torch.empty(num_heads).uniform_(0.0, 4.0)) if iof_bias else None

    def forward(
        self,
        x: Tensor,
        valid: Tensor,
        groups: Tensor | None = None,
        pos: Tensor | None = None,
        boxes: Tensor | None = None,
        residual_with_pos: bool = False,
    ) -> Tensor:
        count = contiguous_groups(groups)
        if count is not None and count > 1:
            x, pos, boxes, valid = (fold_groups(t, count) for t in (x, pos, boxes, valid))
            groups = None
        bias = None
        if self.tau is not None:
            bias = self.tau[None, :, None, None] * torch.log(iof_matrix(boxes.detach())[:, None] + 1e-7)  # (B, H, Q, Q)
        mask = attention_mask(valid, groups, self.num_heads, bias)
        qk = x if pos is None else x + pos
        value = qk if residual_with_pos else x
        out, _ = self.attn(qk, qk, value, attn_mask=mask, need_weights=False)
        out = self.norm(value + out)
        return unfold_groups(out, count) if count is not None and count > 1 else out


def mlp_head(dim: int, layers: int, bias: bool = True) -> nn.Sequential:
    """``layers`` x [Linear(dim, dim) - LayerNorm - ReLU] (empty when 0)."""
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(dim, dim, bias=bias), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks)


class FFN(nn.Module):
    """``LN(x + Linear(ReLU(Linear(x))))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


class MLP(nn.Module):
    """``layers`` Linear maps in_dim -> hidden -> ... -> out_dim with ReLU between them (DETR's box MLP).

    ``last`` is the final Linear (heads zero-initialise it).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @property
    def last(self) -> nn.Linear:
        return self.layers[-1]

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
