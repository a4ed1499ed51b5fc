"""A trained detector turned into a frozen teacher.

Frozen means four things, each tested:

- eval mode is pinned: ``train()`` on the teacher is a no-op, so BatchNorm statistics never move;
- every parameter has ``requires_grad=False`` and the forward runs under ``torch.inference_mode``;
- the teacher is *not* an ``nn.Module`` attribute of anything the optimizer, DDP or the student
  checkpoint can see: ``FrozenTeacher`` is a plain object that holds the detector;
- only the parts the active losses need are run (features alone for feature losses).

Both this class and :class:`teachers.cache.TeacherCache` implement the teacher-source protocol the
``Distiller`` talks to: ``spec`` (DetectorSpec, classes mapped to the student's) and
``inputs(batch, student, needs) -> DistillInputs``.
"""
from __future__ import annotations

import types
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.inputs import DistillInputs
from distill.structures import Batch, DetectorSpec, Matches, Predictions, Target


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
    def spec(self) -> DetectorSpec:
        """The detector's spec with the student's class count when classes are re-indexed."""
        spec = self.model.spec
        return spec if self.class_index is None else replace(spec, num_classes=len(self.class_index))

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.model.strides)

    @property
    def fpn_channels(self) -> int | None:
        return self.model.spec.fpn_channels

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    @property
    def detector(self) -> nn.Module:
        """The detector with its class columns in the student's order (``class_index`` applied): what
        evaluating the teacher on the student's data (the AP gate) must run."""
        return self.model if self.class_index is None else ClassMapped(self.model, self.class_index)

    def to(self, device: torch.device | str) -> "FrozenTeacher":
        self.model.to(device)
        if self.class_index is not None:
            self.class_index = self.class_index.to(device)
        return self

    def inputs(self, batch: Batch, student: DistillInputs | None = None, needs: frozenset[str] = frozenset({"head"})) -> DistillInputs:
        """The teacher side of ``batch``: FPN features, and per ``needs`` its predictions (``"head"``,
        classes mapped to the student's) and its own matching of the batch's GT (``"matches"``).

        Everything is computed under inference mode, then cloned into ordinary constants the
        student's losses may save for backward.
        """
        context, sizes = None, None
        with torch.inference_mode():
            features = self.model.features(batch.images)
            predictions = self.model.head(features, batch.image_sizes) if needs & {"head", "matches"} else None
            matches = self.model.match(predictions, self._teacher_targets(batch.targets), batch.image_sizes) if "matches" in needs else None
            if "decoder_tail" in needs:
                sizes = batch.image_sizes.to(features[0].device)
                context = self.model.crossing_context(features, sizes)
        if context is not None:
            context = [t.clone() for t in context]  # out of inference mode: the tail's backward saves them
        if predictions is not None:
            predictions = predictions.detach()
            if self.class_index is not None:
                predictions.logits = predictions.logits.index_select(-1, self.class_index)
        return DistillInputs(
            spec=self.spec,
            predictions=predictions,
            features=[f.clone() for f in features] if "features" in needs else None,
            matches=_clone_matches(matches),
            image_sizes=batch.image_sizes,
            head_tail=self._head_tail if "head_tail" in needs else None,
            decode=partial(self._decode, features, batch.image_sizes) if "decode" in needs else None,
            decoder_tail=partial(self._decoder_tail, context, sizes) if context is not None else None,
        )

    def _decoder_tail(self, context: list[Tensor], image_sizes: Tensor, content: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """The teacher's last decoder layer and heads on a query state (content (B, Q, D), boxes (B, Q, 4)
        xyxy px), outside inference mode so gradients reach ``content``; its parameters stay frozen.
        ``context``: its :meth:`crossing_context` of the batch, cloned out of inference mode (the
        tail's backward saves it)."""
        predictions = self.model.finish_from_crossing(context, image_sizes, content, boxes, valid)
        if self.class_index is not None:
            predictions = replace(predictions, logits=predictions.logits.index_select(-1, self.class_index))
        return predictions

    def _decode(self, features: list[Tensor], image_sizes: Tensor | None, boxes: Tensor, valid: Tensor) -> Predictions:
        """The teacher's decoder on given query boxes (B, K, 4) xyxy px, on this batch's features:
        its last layer (eval mode), detached, classes mapped to the student's."""
        with torch.inference_mode():
            predictions = self.model.decode_queries(features, image_sizes, boxes, valid, aux=False)
        predictions = predictions.detach()
        if self.class_index is not None:
            predictions.logits = predictions.logits.index_select(-1, self.class_index)
        return predictions

    def _head_tail(self, stage: int, cls_maps: list[Tensor] | None, reg_maps: list[Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
        """The teacher's head from tower stage ``stage`` on (student) maps, outside inference mode so
        gradients reach the maps; the teacher's parameters stay frozen (no grad, eval mode)."""
        cls, bins = self.model.head_from_stage(stage, cls_maps, reg_maps)
        if cls is not None and self.class_index is not None:
            cls = cls.index_select(-1, self.class_index)
        return cls, bins

    def _teacher_targets(self, targets: list[Target]) -> list[Target]:
        """GT labels in the teacher's class indices (its matcher's class costs read them)."""
        if self.class_index is None:
            return targets
        return [Target(t.boxes, self.class_index.to(t.labels.device)[t.labels]) for t in targets]

    def __repr__(self) -> str:
        return f"FrozenTeacher({type(self.model).__name__}, classes={self.num_classes}, strides={self.strides})"


class ClassMapped(nn.Module):
    """A detector whose predictions keep only the columns ``class_index`` (C_student,) selects, in
    that order (its ``features`` / ``postprocess`` unchanged), so detection labels are student classes."""

    def __init__(self, model: nn.Module, class_index: Tensor) -> None:
        super().__init__()
        self.model = model
        self.class_index = class_index

    def features(self, images: Tensor):
        return self.model.features(images)

    def head(self, features, image_sizes: Tensor | None = None, targets=None) -> Predictions:
        predictions = self.model.head(features, image_sizes)
        for p in [predictions, *predictions.aux]:
            p.logits = p.logits.index_select(-1, self.class_index.to(p.logits.device))
        return predictions

    def postprocess(self, predictions: Predictions, image_sizes: Tensor):
        return self.model.postprocess(predictions, image_sizes)


def _clone_matches(matches: Matches | None) -> Matches | None:
    if matches is None:
        return None
    clone = lambda ts: None if ts is None else [t.clone() for t in ts]  # noqa: E731
    return Matches(clone(matches.pred_index), clone(matches.gt_index), clone(matches.weight), {k: clone(v) for k, v in matches.extras.items()})


def load_teacher(path_or_run: str | Path | nn.Module, classes=None) -> FrozenTeacher:
    """A frozen teacher from a checkpoint file or a run folder (its best checkpoint), or from a
    torchvision / transformers detector: a reference such as ``tv:fcos_resnet50_fpn=fcos.pth`` or
    ``hf:FOLDER``, or the model object (``classes``: its label names; see ``teachers.external``)."""
    from distill.checkpoint import resolve_checkpoint
    from students.saved import load_detector
    from teachers.external import load_external, parse_reference, wrap_model

    if isinstance(path_or_run, nn.Module):
        model = wrap_model(path_or_run, classes)
        return FrozenTeacher(model, {"classes": model.classes, "path": type(path_or_run).__name__, "external": True})
    reference = parse_reference(path_or_run)
    if reference is not None:
        model = load_external(reference)
        return FrozenTeacher(model, {"classes": model.classes, "path": str(reference), "external": True})
    path = resolve_checkpoint(path_or_run)
    model, meta = load_detector(path)
    return FrozenTeacher(model, {**meta, "path": str(path)})
