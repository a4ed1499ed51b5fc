"""The student's forward as one ``nn.Module`` call, so that DDP sees it.

DistributedDataParallel synchronises gradients only for work done inside its ``forward``; calling
``student.features`` and ``student.head`` directly would bypass it. Training steps therefore call
the student through :class:`StudentForward` (wrapped in DDP when distributed); the loss and the
distillation terms are computed outside, on what it returns.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class StudentForward(nn.Module):
    """``forward(images (B, 3, H, W), image_sizes (B, 2), targets) -> (FPN features, head predictions)``.

    The targets reach the head (training only): ASAG's generator draws GT / random probe windows.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor, image_sizes: Tensor, targets: list | None = None) -> tuple[list[Tensor], Any]:
        features = self.student.features(images)
        return features, self.student.head(features, image_sizes, targets)


def student_forward(model: nn.Module) -> nn.Module:
    """The callable a step uses: the model itself if it already is a (wrapped) StudentForward."""
    inner = getattr(model, "module", model)
    return model if isinstance(inner, StudentForward) else StudentForward(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The detector under DDP and/or StudentForward."""
    model = getattr(model, "module", model)
    return model.student if isinstance(model, StudentForward) else model
