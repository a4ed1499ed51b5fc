"""Feature pyramid: C3-C5 -> P3-P7 (strides 8 ... 128), RetinaNet / GFL layout."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from students.common.fpn import top_down, xavier_convs

__all__ = ["FPN"]


class FPN(nn.Module):
    """Top-down FPN with two extra stride-2 levels.

    P3-P5: 1x1 lateral conv, nearest-upsampled top-down sum, 3x3 output conv.
    P6: stride-2 3x3 conv on the P5 *output* (mmdet ``add_extra_convs='on_output'``).
    P7: stride-2 3x3 conv on P6, with a ReLU in between when ``relu_before_p7`` (the RetinaNet paper
    and torchvision ``LastLevelP6P7``: it keeps P7 from being a purely linear function of P6).
    mmdet's GFL omits that ReLU; pass ``relu_before_p7=False`` to load mmdet-trained GFL weights.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: width of every P level.

    ``forward([C3, C4, C5]) -> [P3, P4, P5, P6, P7]``, each (B, out_channels, H_l, W_l).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, relu_before_p7: bool = True) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.relu_before_p7 = relu_before_p7
        self.out_channels = out_channels
        xavier_convs(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = top_down(self.lateral, self.output, feats)
        p6 = self.p6(outs[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return outs + [p6, p7]
