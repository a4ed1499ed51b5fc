"""Teacher -> student distillation on top of the shared training loop.

``Distiller`` only relies on the detector contract (``features``, ``head``, ``loss``,
``postprocess``), so any pair implementing it — not only our GFL — distills through it::

    teacher = teachers.load_teacher("runs/teacher")
    student = students.create_student("gfl_resnet18", num_classes=10)
    losses = [distill.create_loss("ld", weight=0.25, region="main"),
              distill.create_loss("ld", weight=0.25, region="vlr"),
              distill.create_loss("kd", weight=0.5, region="main")]
    d = distill.Distiller(student, teacher, losses, recipe)
    d.fit(train_set, val_set, "runs/student")

With ``cache=teachers.TeacherCache.open(path)`` the teacher's rows come from a cache built once by
``detkd cache`` instead of running the teacher every step (the online path is unchanged otherwise).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import Recipe
from distill.engine.evaluate import evaluate_detector
from distill.engine.forward import student_forward, unwrap
from distill.engine.trainer import FitResult, Trainer
from distill.losses import DistillInputs, DistillLoss
from distill.structures import Batch
from teachers.cache import CacheMissError, TeacherCache
from teachers.frozen import FrozenTeacher


def loss_keys(losses: Sequence[DistillLoss]) -> list[str]:
    """Unique log keys: ``loss_ld_main``, ``loss_ld_vlr``, ``loss_kd_main`` (numbered if repeated)."""
    keys, seen = [], {}
    for loss in losses:
        key = f"loss_{loss.name}_{loss.region.name}"
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return keys


def distillation_terms(
    losses: Sequence[DistillLoss], keys: Sequence[str], student: DistillInputs, teacher: DistillInputs, targets
) -> dict[str, Tensor]:
    """Every distillation term of one batch, keyed by ``keys``; regions are hashable, so each distinct
    mask is computed once and shared by the losses that use it. ``student`` carries the outputs and
    assignment the regions are computed from."""
    outputs, assignment = student.require_outputs("locations"), student.assignment
    masks: dict[Any, Tensor] = {}
    terms: dict[str, Tensor] = {}
    for key, loss in zip(keys, losses):
        if loss.region not in masks:
            masks[loss.region] = loss.region(outputs.points, outputs.strides, targets, assignment)
        try:
            terms[key] = loss(student, teacher, masks[loss.region])
        except CacheMissError as exc:
            raise CacheMissError(f"{key}: {exc}") from None
    return terms


class Distiller:
    """A trainable student, a frozen teacher and weighted distillation losses.

    The student keeps its own losses (``student.loss``); each distillation term is logged
    separately. The teacher is never registered anywhere the optimizer, DDP or the student
    checkpoint could find it.

    ``cache``: a :class:`~teachers.cache.TeacherCache` of this teacher on the training split; the
    teacher is then not run in :meth:`step` (it is still used by :meth:`evaluate` and the checks).
    """

    def __init__(
        self, student: nn.Module, teacher: FrozenTeacher, losses: Sequence[DistillLoss], recipe: Recipe | None = None, cache: TeacherCache | None = None
    ) -> None:
        if not isinstance(teacher, FrozenTeacher):
            teacher = FrozenTeacher(teacher)
        self.student = student
        self.teacher = teacher
        self.losses = list(losses)
        self.recipe = recipe
        self.keys = loss_keys(self.losses)
        self.needs_head = any("head" in loss.needs for loss in self.losses)
        self.needs_features = any("features" in loss.needs for loss in self.losses)
        self.cache = cache

    def to(self, device: torch.device | str) -> "Distiller":
        self.student.to(device)
        self.teacher.to(device)
        for loss in self.losses:
            loss.to(device)
        return self

    @property
    def trainable_extras(self) -> dict[str, nn.Module]:
        """Loss modules with parameters (feature adapters): trained with the student, not shipped."""
        return {key: loss for key, loss in zip(self.keys, self.losses) if any(p.requires_grad for p in loss.parameters())}

    def step(self, student: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Student losses plus every distillation term, for one batch."""
        features, outputs = student_forward(student)(batch.images, batch.image_sizes)  # DDP-visible forward
        terms, assignment = unwrap(student).loss(outputs, batch.targets, batch.image_sizes)
        if not self.losses:
            return terms
        s_in = DistillInputs(outputs=outputs, features=features if self.needs_features else None, assignment=assignment)
        t_in = self.teacher_inputs(batch, outputs)
        terms.update(distillation_terms(self.losses, self.keys, s_in, t_in, batch.targets))
        return terms

    def teacher_inputs(self, batch: Batch, outputs) -> DistillInputs:
        """The teacher side of a batch: rows from the cache, or the online teacher's outputs."""
        if self.cache is not None:
            return self.cache.inputs(batch, outputs, features=self.needs_features)
        t_features, t_outputs = self.teacher.run(batch.images, head=self.needs_head)
        return DistillInputs(outputs=t_outputs, features=t_features if self.needs_features else None)

    def fit(
        self, train_set, val_set, out: str | Path, meta: dict[str, Any] | None = None, resume: bool = False, show_progress: bool = True, runtime=None
    ) -> FitResult:
        if self.recipe is None:
            raise ValueError("Distiller.fit needs a recipe (its train/eval settings)")
        meta = {"student": self.student.config, "classes": list(train_set.classes), "cat_ids": list(train_set.cat_ids), "image_size": self.recipe.data.image_size, **(meta or {})}
        if self.cache is not None:  # refuse a cache that does not fit, then draw only cached variants
            self.cache.check_run(self.teacher, train_set, self.losses, self.recipe.data.size_divisor, self.student)
            train_set = self.cache.training_set(train_set)
        if runtime is not None:
            self.to(runtime.torch_device)  # student, teacher (never DDP-wrapped) and loss modules
        trainer = Trainer(
            self.student, self.recipe, train_set, val_set, out, meta, step_fn=self.step, extra_modules=self.trainable_extras,
            show_progress=show_progress, runtime=runtime,
        )
        return trainer.fit(resume=resume)

    def evaluate(self, dataset, batch_size: int = 16) -> dict[str, dict[str, float]]:
        """COCO metrics of the student and of the teacher on the same data."""
        return {
            "student": evaluate_detector(self.student, dataset, batch_size),
            "teacher": evaluate_detector(self.teacher.model, dataset, batch_size),
        }
