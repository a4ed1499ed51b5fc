"""The precision losses, assigners and box codecs compute in.

Under autocast the detector's activations are bf16 / fp16; every loss, assignment and box decode
upcasts them first. It upcasts to the *default* float dtype rather than hard-coding fp32: that is
fp32 in every normal run, and fp64 in a reference run (``DETKD_DTYPE=float64``, see
``distill.engine.device``), where the whole computation, not only the network, must be fp64 so
that tests can prove two computations are the same math with rounding far below what they check.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype() -> torch.dtype:
    """The floating dtype losses compute in: ``torch.get_default_dtype()`` (fp32, or fp64)."""
    return torch.get_default_dtype()


def upcast(x: Tensor) -> Tensor:
    """``x`` in the compute dtype (bf16 / fp16 / bool / int -> fp32, or fp64 in a reference run)."""
    return x.to(torch.get_default_dtype())
