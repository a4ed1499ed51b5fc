"""DAB-DETR's cross-attention: Conditional-DETR content / position split, width-height modulated.

Cross-attention logits of query q and image token k, per head h (d = D / heads)::

    logit_h(q, k) = ([c_q ; s_q]_h . [c_k ; p_k]_h) / sqrt(2 d)
                  = (c_q,h . c_k,h + s_q,h . p_k,h) / sqrt(2 d)

``c`` are content projections, ``p_k`` the projected sine encoding of the token's position, and
``s_q`` the projected *modulated* sine encoding of the query's anchor centre: the x half of the
centre's encoding scaled by ``w_ref / w``, the y half by ``h_ref / h`` (``w, h`` the anchor's size,
``w_ref, h_ref = sigmoid(MLP(content))``), so a wide anchor spreads its positional attention along x
and a tall one along y (:func:`modulate_position`). Concatenating content and position per head
(instead of adding them) keeps the two similarities separate terms of the logit. At the first
layer the content halves also get the positional parts added (``q_pos`` / key position), as in
Conditional DETR, since the content query is still zero there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["modulate_position", "ConditionalCrossAttention"]


def modulate_position(sine_xy: Tensor, ref_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """sine_xy (..., D): x encoding in the first D / 2 dims, y in the last; ref_wh, anchor_wh (..., 2)
    -> (..., D) with the x half times ``w_ref / w`` and the y half times ``h_ref / h``."""
    half = sine_xy.shape[-1] // 2
    scale_x = (ref_wh[..., 0] / anchor_wh[..., 0])[..., None]
    scale_y = (ref_wh[..., 1] / anchor_wh[..., 1])[..., None]
    return torch.cat([sine_xy[..., :half] * scale_x, sine_xy[..., half:] * scale_y], dim=-1)


class ConditionalCrossAttention(nn.Module):
    """``forward(tgt (B, Q, D), query_pos (B, Q, D), sine_xy (B, Q, D), memory (B, N, D), memory_pos (B, N, D),
    padding (B, N)) -> (B, Q, D)`` (before the residual). ``first``: the layer adds the positional
    parts to the content halves (and owns the projection of ``query_pos``)."""

    def __init__(self, dim: int, num_heads: int, first: bool) -> None:
        super().__init__()
        self.num_heads, self.first = num_heads, first
        self.q_content, self.k_content, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_sine, self.k_pos = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim) if first else None
        self.out = nn.Linear(dim, dim)

    def logits(self, q_content: Tensor, q_sine: Tensor, k_content: Tensor, k_pos: Tensor) -> Tensor:
        """Projected (B, Q, D), (B, Q, D), (B, N, D), (B, N, D) -> logits (B, heads, Q, N), per head
        ``[c_q ; s_q] . [c_k ; p_k] / sqrt(2 d)``."""
        heads = self.num_heads
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  (B, H, L, d)
        q = torch.cat([split(q_content), split(q_sine)], dim=-1)  # (B, H, Q, 2d)
        k = torch.cat([split(k_content), split(k_pos)], dim=-1)  # (B, H, N, 2d)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def forward(self, tgt: Tensor, query_pos: Tensor, sine_xy: Tensor, memory: Tensor, memory_pos: Tensor, padding: Tensor) -> Tensor:
        q_content, k_content, k_pos = self.q_content(tgt), self.k_content(memory), self.k_pos(memory_pos)
        if self.q_pos is not None:
            q_content = q_content + self.q_pos(query_pos)
            k_content = k_content + k_pos
        split = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, H, L, d)
        q = torch.cat([split(q_content), split(self.q_sine(sine_xy))], dim=-1)  # (B, H, Q, 2d)
        k = torch.cat([split(k_content), split(k_pos)], dim=-1)  # (B, H, N, 2d)
        # softmax(logits) @ value with the logits of :meth:`logits`, fused (the (B, H, Q, N) weights never stored)
        out = F.scaled_dot_product_attention(q, k, split(self.v(memory)), attn_mask=~padding[:, None, None, :])  # (B, H, Q, d)
        return self.out(out.transpose(1, 2).flatten(2))
