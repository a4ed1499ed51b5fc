"""A trained detector turned into a frozen teacher.

Frozen means four things, each tested:

- eval mode is pinned: ``train()`` on the teacher is a no-op, so BatchNorm statistics never move;
- every parameter has ``requires_grad=False`` and the forward runs under ``torch.inference_mode``;
- the teacher is *not* an ``nn.Module`` attribute of anything the optimizer, DDP or the student
  checkpoint can see: ``FrozenTeacher`` is a plain object that holds the detector;
- only the parts the active losses need are run (features alone for feature losses).
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.structures import DenseOutputs


def _pinned_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Calls Module.train(False) whatever ``mode`` says: a teacher's BN/GN statistics are part of
    # what it learned, and batch statistics of a small distillation batch would replace them.
    return nn.Module.train(self, False)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode pinned on every submodule, no gradients. Returns the same module."""
    model.requires_grad_(False)
    model.eval()
    for module in model.modules():
        module.train = types.MethodType(_pinned_train, module)
    return model


def _detach_outputs(outputs: DenseOutputs) -> DenseOutputs:
    # Tensors made under inference_mode cannot be saved for backward by the student's losses;
    # a clone outside inference mode is an ordinary constant tensor.
    return DenseOutputs(
        cls_logits=[x.clone() for x in outputs.cls_logits],
        reg_logits=[x.clone() for x in outputs.reg_logits],
        points=outputs.points.clone(),
        strides=outputs.strides.clone(),
        level_sizes=list(outputs.level_sizes),
        reg_max=outputs.reg_max,
    )


class FrozenTeacher:
    """Holds a detector implementing ``features / head / postprocess``; runs it without gradients.

    ``class_index`` (C_student,) optionally reorders/selects the teacher's class logits so that
    column c of the teacher's outputs is student class c.
    """

    def __init__(self, model: nn.Module, meta: dict[str, Any] | None = None, class_index: Tensor | None = None) -> None:
        self.model = freeze(model)
        self.meta = dict(meta or {})
        self.class_index = class_index

    # Attributes the pair checks read, forwarded from the detector.
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.model.strides)

    @property
    def reg_max(self) -> int:
        return self.model.reg_max

    @property
    def fpn_channels(self) -> int:
        return self.model.fpn_channels

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    def to(self, device: torch.device | str) -> "FrozenTeacher":
        self.model.to(device)
        if self.class_index is not None:
            self.class_index = self.class_index.to(device)
        return self

    def run(self, images: Tensor, head: bool = True) -> tuple[list[Tensor], DenseOutputs | None]:
        """FPN features, and the head outputs when ``head`` (classes already mapped to the student's)."""
        with torch.inference_mode():
            features = self.model.features(images)
            outputs = self.model.head(features) if head else None
        features = [f.clone() for f in features]
        if outputs is None:
            return features, None
        outputs = _detach_outputs(outputs)
        if self.class_index is not None:
            outputs.cls_logits = [x.index_select(1, self.class_index) for x in outputs.cls_logits]
        return features, outputs

    def __repr__(self) -> str:
        return f"FrozenTeacher({type(self.model).__name__}, classes={self.num_classes}, strides={self.strides})"


def load_teacher(path_or_run: str | Path) -> FrozenTeacher:
    """A frozen teacher from a checkpoint file or a run folder (its best checkpoint)."""
    from distill.engine.checkpoint import load_detector, resolve_checkpoint

    path = resolve_checkpoint(path_or_run)
    model, meta = load_detector(path)
    return FrozenTeacher(model, {**meta, "path": str(path)})
