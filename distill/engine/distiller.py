"""Teacher -> student distillation on top of the shared training loop.

``Distiller`` only relies on the detector contract (``distill.detector``: ``features``, ``head``,
``loss``, ``postprocess``, ``spec``), so any pair implementing it — dense or sparse, not only our
GFL — distills through it::

    teacher = teachers.load_teacher("runs/teacher")
    student = students.create_student("gfl_resnet18", num_classes=10)
    losses = [distill.create_loss("ld", weight=0.25, pairer="main"),
              distill.create_loss("ld", weight=0.25, pairer="vlr"),
              distill.create_loss("kd", weight=0.5, pairer="main")]
    d = distill.Distiller(student, teacher, losses, recipe)
    d.fit(train_set, val_set, "runs/student")

The teacher side comes from a *teacher source*: the frozen teacher itself, or, with
``cache=teachers.TeacherCache.open(path)``, the rows a ``detkd cache`` build stored (the teacher is
then not run in training steps). Both implement ``spec`` and ``inputs(batch, student, needs)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import Recipe
from distill.detector import TeacherSource
from distill.engine.evaluate import evaluate_detector
from distill.engine.forward import student_forward, unwrap
from distill.engine.trainer import FitResult, Trainer
from distill.inputs import DistillInputs
from distill.losses import DistillLoss
from distill.structures import Batch, Pairs
from teachers.cache import TeacherCache
from teachers.checks import check_pair
from teachers.frozen import FrozenTeacher


def loss_keys(losses: Sequence[DistillLoss]) -> list[str]:
    """Unique log keys: ``loss_ld_main``, ``loss_ld_vlr``, ``loss_kd_main`` (numbered if repeated)."""
    keys, seen = [], {}
    for loss in losses:
        key = f"loss_{loss.name}_{loss.pairer.name}"
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return keys


def teacher_needs(losses: Sequence[DistillLoss]) -> frozenset[str]:
    """What the teacher source must provide: the parts the losses read and what their pairers need."""
    needs: set[str] = set()
    for loss in losses:
        needs |= loss.needs | loss.pairer.teacher_needs
    return frozenset(needs)


def student_heads(student: DistillInputs) -> list[DistillInputs]:
    """The final head, then every auxiliary head / earlier stage with its own matches."""
    heads = [student]
    preds, matches = student.predictions, student.matches
    for i, aux in enumerate(preds.aux if preds is not None else []):
        aux_matches = matches.aux[i] if matches is not None and i < len(matches.aux) else None
        heads.append(DistillInputs(student.spec, aux, student.features, aux_matches, student.image_sizes))
    return heads


@dataclass(frozen=True)
class SharedSide:
    """A ``shared_queries`` pairer's two sides: the student's decoder run on the shared boxes, and the
    teacher side its pairs read (the teacher's own, or its decoder run on the same boxes)."""

    student: DistillInputs
    teacher: DistillInputs


def shared_sides(losses: Sequence[DistillLoss], detector: nn.Module, features, teacher: DistillInputs, image_sizes) -> dict[Any, SharedSide]:
    """For each ``shared_queries`` pairer: the student's decoder run on the teacher's boxes (KD-DETR),
    and where the pairer asks (random points) the teacher's decoder on the same boxes.

    The extra pass runs on the unwrapped detector after the DDP-visible forward, on the same
    features: its gradients reach the same parameters within the same backward, so DDP reduces
    their sum (each parameter's gradient is accumulated once per backward).
    """
    sides = {}
    for pairer in dict.fromkeys(loss.pairer for loss in losses if loss.pairer.shared_student):
        boxes, valid, _ = pairer.teacher_queries(teacher)
        # auxiliary heads only when a term on this pairer reads them (heads: all)
        aux = any(loss.heads == "all" for loss in losses if loss.pairer == pairer)
        predictions = detector.decode_queries(features, image_sizes, boxes, valid, aux=aux)
        teacher_side = teacher
        if pairer.teacher_decodes:
            if teacher.decode is None:
                raise ValueError(f"pairer {pairer} runs the teacher's decoder on its points, but this teacher source cannot (a cache)")
            teacher_side = DistillInputs(teacher.spec, teacher.decode(boxes, valid), None, None, image_sizes)
        sides[pairer] = SharedSide(DistillInputs(detector.spec, predictions, None, None, image_sizes), teacher_side)
    return sides


def distillation_terms(
    losses: Sequence[DistillLoss], keys: Sequence[str], student: DistillInputs, teacher: DistillInputs, targets,
    shared: dict[Any, SharedSide] | None = None,
) -> dict[str, Tensor]:
    """Every distillation term of one batch, keyed by ``keys``. Pairers are hashable, so each
    distinct (pairer, space, head) is computed once and shared by the losses that use it. A loss
    with ``heads="all"`` is the mean of its value on every student head. ``shared``: the student
    sides of ``shared_queries`` pairers (:func:`shared_sides`)."""
    pairs: dict[Any, Pairs] = {}
    terms: dict[str, Tensor] = {}
    own = student_heads(student) if any(loss.heads == "all" for loss in losses) else [student]
    for key, loss in zip(keys, losses):
        values = []
        their = teacher
        if loss.pairer.shared_student:
            if shared is None or loss.pairer not in shared:
                raise ValueError(f"{key}: pairer {loss.pairer} needs the student's decoder run on the teacher's boxes (shared_sides)")
            base, their = shared[loss.pairer].student, shared[loss.pairer].teacher
            heads = student_heads(base) if loss.heads == "all" else [base]
        else:
            heads = own if loss.heads == "all" else own[:1]
        for h, side in enumerate(heads):
            slot = (loss.pairer, loss.space, h, loss.pairer.shared_student)
            if slot not in pairs:
                pairs[slot] = loss.pairer(side, their, targets, loss.space)
            values.append(loss(side, their, pairs[slot]))
        terms[key] = values[0] if len(values) == 1 else torch.stack(values).mean()
    return terms


class Distiller:
    """A trainable student, a frozen teacher and weighted distillation losses.

    The student keeps its own losses (``student.loss``); each distillation term is logged
    separately. The teacher is never registered anywhere the optimizer, DDP or the student
    checkpoint could find it. Every loss's pair check runs here, before any batch; a cache is
    checked against the run in :meth:`check_cache` (by :meth:`fit`, or by its caller).

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
        self.needs = teacher_needs(self.losses)
        self.needs_features = "features" in self.needs
        self.needs_shared = any(loss.pairer.shared_student for loss in self.losses)
        self.cache = cache
        self.source: TeacherSource = cache if cache is not None else teacher
        # The pair is the student and the teacher; a cache is checked to hold this teacher's rows
        # (check_cache), so its spec is the teacher's.
        check_pair(student.spec, teacher.spec, self.losses)

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
        terms, features, s_in = self.student_side(student, batch)
        if not self.losses:
            return terms
        t_in = self.teacher_side(batch, s_in)
        terms.update(self.distillation_terms(unwrap(student), features, s_in, t_in, batch))
        return terms

    # The three parts of a step, public so that a benchmark can time each without copying the step.
    def student_side(self, student: nn.Module, batch: Batch) -> tuple[dict[str, Tensor], list[Tensor], DistillInputs]:
        """The student's (DDP-visible) forward and own losses: (its loss terms, its feature maps, its
        side of the distillation terms; features in it only when a term reads them)."""
        features, predictions = student_forward(student)(batch.images, batch.image_sizes, batch.targets)
        detector = unwrap(student)
        terms, matches = detector.loss(predictions, batch.targets, batch.image_sizes)
        return terms, features, DistillInputs(detector.spec, predictions, features if self.needs_features else None, matches, batch.image_sizes)

    def teacher_side(self, batch: Batch, student: DistillInputs) -> DistillInputs:
        """What the teacher source (frozen teacher or cache) provides for this batch."""
        return self.source.inputs(batch, student, self.needs)

    def distillation_terms(self, detector: nn.Module, features: list[Tensor], student: DistillInputs, teacher: DistillInputs, batch: Batch) -> dict[str, Tensor]:
        """Every distillation term, keyed by :attr:`keys`; the student's decoder runs once more on the
        teacher's boxes first where a ``shared_queries`` pairer needs it (``detector``: unwrapped)."""
        shared = shared_sides(self.losses, detector, features, teacher, batch.image_sizes) if self.needs_shared else None
        return distillation_terms(self.losses, self.keys, student, teacher, batch.targets, shared)

    def check_cache(self, train_set):
        """The split training draws from: with a cache, ``train_set`` restricted to it (cached
        variants only, collated on its canvas) once the cache is found to fit the run (teacher,
        data, transform, regions, variants; :meth:`TeacherCache.check_run` raises CheckpointError
        otherwise); without one, ``train_set`` itself."""
        if self.cache is None:
            return train_set
        if self.recipe is None:
            raise ValueError("Distiller.check_cache needs a recipe (its data.size_divisor)")
        self.cache.check_run(self.teacher, train_set, self.losses, self.recipe.data.size_divisor, self.student)
        return self.cache.training_set(train_set)

    def fit(
        self, train_set, val_set, out: str | Path, meta: dict[str, Any] | None = None, resume: bool = False, show_progress: bool = True,
        runtime=None, cache_checked: bool = False,
    ) -> FitResult:
        """Train the student on ``train_set``. With a cache, :meth:`check_cache` runs first, unless
        ``cache_checked``: ``train_set`` is then the split it returned (``distill_run`` checks the
        cache before it evaluates the teacher, and the check hashes the teacher and the data)."""
        if self.recipe is None:
            raise ValueError("Distiller.fit needs a recipe (its train/eval settings)")
        meta = {"student": self.student.config, "classes": list(train_set.classes), "cat_ids": list(train_set.cat_ids), "image_size": self.recipe.data.image_size, **(meta or {})}
        if not cache_checked:
            train_set = self.check_cache(train_set)
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
