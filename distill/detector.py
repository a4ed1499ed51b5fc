"""The detector contract the engine, the losses and the teachers rely on (dense and sparse alike).

A detector is an ``nn.Module`` with explicit stages, so the engine can pull what distillation needs
without hooks::

    features = model.features(images)                 # list of FPN maps (B, C_l, H_l, W_l)
    predictions = model.head(features, image_sizes, targets)   # Predictions (DenseOutputs for dense heads)
    losses, matches = model.loss(predictions, targets, image_sizes)
    matches = model.match(predictions, targets, image_sizes)   # matching alone (teachers)
    detections = model.postprocess(predictions, image_sizes)   # list[Detections]
    model(images, image_sizes) == model.head(model.features(images), image_sizes)

``image_sizes`` is (B, 2) int64 (height, width) of each image inside the batch padding; ``None``
means every image fills the canvas. ``targets`` reach the head in training steps only (None in
evaluation and for a frozen teacher): a head whose query generation learns from the ground truth
(ASAG's anchor generator: GT and random probe windows) reads them; every other head ignores them. Attributes: ``family`` ("dense" | "sparse"), ``spec``
(:class:`~distill.structures.DetectorSpec`), ``config`` (registry name + params, set by
``students.create_student``).

Sparse detectors whose decoder can start from given boxes (``spec.query_boxes``) also expose::

    predictions = model.decode_queries(features, image_sizes, boxes (B, K, 4), valid (B, K), aux=True)

(the teacher's boxes as an extra query group, isolated from the detector's own queries: the
``shared_queries`` pairer; training only, nothing changes at inference; ``aux=False`` when no term
reads the auxiliary heads, so a detector may skip them).

A dense detector that refines its detections after postprocess (RefineBox, ``teachers.refine``) also
exposes the same step for the export graph, on padded detections::

    boxes = model.refine_exported(predictions, boxes (B, D, 4), scores (B, D), valid (B, D), image_sizes)

Dense detectors whose label assignment does not depend on the predictions (ATSS ranks fixed anchors)
also expose it, so the teacher cache selects exactly the locations the student will use::

    matches = model.grid_matches(points, strides, level_sizes, targets, image_sizes)
    model.matching_config   # JSON-able description, part of a cache's fingerprint
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from distill.inputs import DistillInputs
from distill.structures import Batch, Detections, DetectorSpec, Matches, Predictions, Target


@runtime_checkable
class Detector(Protocol):
    family: ClassVar[str]
    config: dict

    @property
    def spec(self) -> DetectorSpec: ...

    def features(self, images: Tensor) -> list[Tensor]: ...

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets: list[Target] | None = None) -> Predictions: ...

    def loss(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> tuple[dict[str, Tensor], Matches]: ...

    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> Matches: ...

    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]: ...


@runtime_checkable
class GridAssigner(Protocol):
    """Dense detectors whose matching depends only on the grid and the ground truth."""

    matching_config: dict[str, Any]

    def grid_matches(
        self, points: Tensor, strides: Tensor, level_sizes: list[tuple[int, int]], targets: list[Target], image_sizes: Tensor | None
    ) -> Matches: ...


@runtime_checkable
class TeacherSource(Protocol):
    """What the Distiller reads the teacher side from: ``teachers.FrozenTeacher`` (runs the frozen
    detector) and ``teachers.TeacherCache`` (serves stored rows; its misses are its own errors).

    ``needs`` names what the losses and pairers read: ``"head"`` (predictions), ``"features"``
    (FPN maps), ``"matches"`` (the teacher's own matching of the batch's GT).
    """

    @property
    def spec(self) -> DetectorSpec: ...

    def inputs(self, batch: Batch, student: DistillInputs, needs: frozenset[str]) -> DistillInputs: ...


FAMILIES = ("dense", "sparse")
