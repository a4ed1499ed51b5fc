"""FPN pieces every family builds its pyramid from: the top-down pathway and mmdet's conv init."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["top_down", "xavier_convs"]


def xavier_convs(module: nn.Module) -> None:
    """mmdet FPN init: every conv xavier uniform, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def top_down(lateral: nn.ModuleList, output: nn.ModuleList, feats: list[Tensor]) -> list[Tensor]:
    """1x1 laterals, coarse-to-fine nearest upsampling and sums, 3x3 outputs: one map per input level."""
    laterals = [conv(x) for conv, x in zip(lateral, feats)]
    for i in range(len(laterals) - 1, 0, -1):
        # size= (not scale_factor=2) so odd input sizes still line up.
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
    return [conv(x) for conv, x in zip(output, laterals)]
