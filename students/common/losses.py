"""Losses every detector family uses: the Distribution Focal Loss of per-edge bin heads.

GFL's dense head and the sparse family's bins box head both learn edge distributions with DFL, so
it lives here once (a family never imports another family).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype

__all__ = ["distribution_focal_loss"]


def distribution_focal_loss(bin_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss: cross-entropy to the two bins around a continuous target.

    bin_logits: (K, R + 1); target: (K,) distances in bins within [0, R - eps].
    Returns (K,) float32: ``(y_r - y) * CE(y_l) + (y - y_l) * CE(y_r)`` with ``y_l = floor(y)``,
    ``y_r = y_l + 1``, which is minimal when the expected bin equals ``y``.
    """
    log_probs = bin_logits.to(compute_dtype()).log_softmax(dim=-1)
    max_bin = log_probs.shape[-1] - 1
    # Clamping keeps the gather in range (an out-of-range index is a device assert on CUDA);
    # at y = R the right weight is 0, so clamping its index changes nothing.
    target = target.detach().to(compute_dtype()).clamp(0, max_bin)
    # A target computed from diverged predictions (sparse bins sit on predicted boxes) is NaN:
    # index with 0 instead and give that row a NaN loss, so the trainer's non-finite guard sees it
    # (a NaN cast to long is an arbitrary index: a crash on the CPU, a device assert on CUDA).
    finite = torch.isfinite(target)
    target = torch.where(finite, target, torch.zeros_like(target))
    left = target.floor().long()
    right = (left + 1).clamp(max=max_bin)
    weight_left = left.to(compute_dtype()) + 1 - target
    weight_right = target - left.to(compute_dtype())
    nll_left = -log_probs.gather(1, left[:, None]).squeeze(1)
    nll_right = -log_probs.gather(1, right[:, None]).squeeze(1)
    loss = nll_left * weight_left + nll_right * weight_right
    return torch.where(finite, loss, torch.full_like(loss, float("nan")))
