"""DAB-DETR's image side: multi-scale input projection and a light transformer encoder.

Why this and not DETR's C5 + 6-layer encoder: at 128-160 px the stride-32 map is 4 x 4 to 5 x 5
cells of 32 px, coarser than the scenes' smallest objects (13 px), and DETR-style detectors trained
on C5 alone converge slowly. The backbone's stride 8 / 16 / 32 maps, projected to the decoder width
by a 1x1 conv + GroupNorm each (Deformable DETR's input projection), give 256 + 64 + 16 = 336
tokens at 128 px and 525 at 160 px: few enough for *dense* global cross-attention on a CPU
(queries x tokens x width = 100 x 336 x 128 = 4.3 M multiply-adds per layer and image), so the
decoder keeps DAB-DETR's exact attention and needs no deformable sampling. A learned level
embedding tells the levels apart. The encoder (``encoder_layers`` post-norm self-attention + FFN
layers over all tokens, position added to queries and keys, padding masked) is optional:
0 layers is the fastest and still trains (the backbone has its own context), 1 adds global context
for ~2x one decoder layer's cost (336^2 token pairs).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from students.sparse.layers import FFN

__all__ = ["InputProjection", "EncoderLayer"]


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 when they divide the width (Deformable DETR), else the largest divisor <= 32."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


class InputProjection(nn.Module):
    """``forward([C_l (B, c_l, H_l, W_l)]) -> [(B, D, H_l, W_l)]``: 1x1 conv + GroupNorm per level."""

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(_groups(dim), dim)) for c in in_channels)
        for level in self.levels:
            nn.init.xavier_uniform_(level[0].weight)
            nn.init.zeros_(level[0].bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [proj(x) for proj, x in zip(self.levels, feats)]


class EncoderLayer(nn.Module):
    """``LN(x + MHSA(x + pos, x + pos, x))`` with padding keys masked, then ``FFN``; (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)

    def forward(self, x: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        qk = x + pos
        out, _ = self.attn(qk, qk, x, key_padding_mask=padding, need_weights=False)
        return self.ffn(self.norm(x + out))
