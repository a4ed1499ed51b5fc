"""Typed containers shared by data, detectors, losses and the engine: the detector contract.

Coordinates are always ``xyxy`` in pixels of the *network input* (after resize, before padding)
unless a name says otherwise.

The contract every detector (dense or sparse) speaks:

- :class:`Predictions` — what ``head(features, image_sizes)`` returns: P predictions per image
  (dense locations or queries), each with class logits, a box and a valid flag, optionally per-edge
  box distributions (:class:`BoxBins`) and auxiliary heads / earlier stages (``aux``).
  :class:`DenseOutputs` is the dense kind: it adds the location grid (points, strides, level
  sizes), flattened level by level (P3 first), row-major inside a level.
- :class:`Matches` — what ``loss`` matched: per image (prediction index, GT index, weight) rows
  plus named extras (ATSS thresholds for VLR). A dense assigner and a Hungarian matcher fill the
  same type.
- :class:`Pairs` — what a distillation loss reads: ``(image, student index, teacher index,
  weight)`` rows, made by a pairer (``distill.pairers``). Each side is read with its own index.
- :class:`DetectorSpec` — the facts pair checks need (family, classes, strides, bins, channels).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor

from distill.ops.precision import compute_dtype


def _to(obj, device: torch.device | str, floats: torch.dtype | None = None):
    """Return a copy of a dataclass with every tensor field (and lists / dicts of tensors) moved;
    with ``floats``, floating-point tensor fields are also cast to that dtype."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor) and floats is not None and value.is_floating_point():
            changes[f.name] = value.to(device, floats)
        elif isinstance(value, Tensor) or hasattr(value, "to") and not isinstance(value, (str, type)):
            changes[f.name] = value.to(device)
        elif isinstance(value, list) and value and (isinstance(value[0], Tensor) or hasattr(value[0], "to")):
            changes[f.name] = [v.to(device) for v in value]
        elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            changes[f.name] = {k: [t.to(device) for t in v] for k, v in value.items()}
    return replace(obj, **changes)


@dataclass
class Target:
    """Ground truth of one image.

    boxes:  (G, 4) float32 xyxy, input pixels.
    labels: (G,) int64 contiguous class indices in [0, C).
    """

    boxes: Tensor
    labels: Tensor

    @staticmethod
    def empty() -> "Target":
        return Target(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))

    def to(self, device) -> "Target":
        """Moved to ``device``, boxes in the compute dtype (fp32; fp64 in a reference run)."""
        return _to(self, device, compute_dtype())


@dataclass
class Batch:
    """A collated batch.

    images:      (B, 3, H, W) float32, normalized, zero-padded to a multiple of the size divisor.
    targets:     B ground truths in input pixels.
    image_ids:   B COCO image ids.
    image_sizes: (B, 2) int64 (height, width) of each resized image inside the padding.
    scales:      (B,) float32; input pixels = original pixels * scale.
    flipped:     (B,) bool; True when the image was horizontally flipped.
    """

    images: Tensor
    targets: list[Target]
    image_ids: list[int]
    image_sizes: Tensor
    scales: Tensor
    flipped: Tensor

    def to(self, device) -> "Batch":
        """Moved to ``device``; images, boxes and scales in the compute dtype (fp32; fp64 in a
        reference run, whose models are built in fp64)."""
        return _to(self, device, compute_dtype())

    def __len__(self) -> int:
        return self.images.shape[0]


# ------------------------------------------------------------------------------------ predictions
@dataclass
class BoxBins:
    """Per-edge box distributions and what they are measured from.

    Edge e of prediction p lies at distance ``d = sum_k softmax(logits)_k * k * spacing[..., e]``
    from ``centers`` (left / top edges at ``center - d``, right / bottom at ``center + d``).

    logits:  (B, P, 4, K) bin logits, edges (left, top, right, bottom).
    centers: (B | 1, P, 2) xy reference point of each prediction in input pixels (GFL: the
             location centre; a sparse distribution head: the proposal centre).
    spacing: (B | 1, P, 1 | 4) pixels per bin of each edge (GFL: the stride; a sparse head: a
             fraction of the proposal's width / height).

    Two models with other references or spacings describe the same box with other bins;
    :meth:`encode` expresses any box in this model's bins, which is what a loss needs to compare a
    teacher's edges with a student's.
    """

    logits: Tensor
    centers: Tensor
    spacing: Tensor

    @property
    def num_bins(self) -> int:
        return self.logits.shape[-1]

    def distances(self) -> Tensor:
        """(B, P, 4) expected edge distances in bin units (float32)."""
        probs = self.logits.to(compute_dtype()).softmax(dim=-1)
        bins = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        return (probs * bins).sum(dim=-1)  # elementwise, not a matmul: stays fp32 under autocast

    def decode(self) -> Tensor:
        """(B, P, 4) xyxy boxes in input pixels."""
        return edges_to_boxes(self.centers.to(compute_dtype()), self.distances() * self.spacing.to(compute_dtype()))

    def encode(self, boxes: Tensor) -> Tensor:
        """boxes (B, P, 4) xyxy pixels -> (B, P, 4) edge distances in this model's bin units.

        Not clamped: a value outside ``[0, K - 1]`` means the box does not fit this model's range.
        """
        c = self.centers.to(compute_dtype())
        pixels = torch.stack(
            [c[..., 0] - boxes[..., 0], c[..., 1] - boxes[..., 1], boxes[..., 2] - c[..., 0], boxes[..., 3] - c[..., 1]], dim=-1
        )
        return pixels / self.spacing.to(compute_dtype())

    def rows(self, image: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(R,) image and prediction indices -> logits (R, 4, K), centers (R, 2), spacing (R, 4)."""
        centers = self.centers.expand(self.logits.shape[0], -1, -1)
        spacing = self.spacing.expand(self.logits.shape[0], -1, 4)
        return self.logits[image, index], centers[image, index], spacing[image, index]

    def to(self, device) -> "BoxBins":
        return _to(self, device)


def edges_to_boxes(centers: Tensor, distances: Tensor) -> Tensor:
    """centers (..., 2) and (left, top, right, bottom) distances (..., 4) -> (..., 4) xyxy."""
    return torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], dim=-1)


@dataclass
class Predictions:
    """What a detector head returns for a batch: P predictions per image.

    logits: (B, P, C) class logits (sigmoid detectors: one logit per class, no background).
    boxes:  (B, P, 4) xyxy in input pixels (not clipped).
    valid:  (B, P) bool; False for padding queries and for locations outside the image. Losses and
            pairers never read an invalid prediction.
    bins:   per-edge box distributions (:class:`BoxBins`), for heads that predict them.
    aux:    Predictions of auxiliary heads or earlier decoder stages (training only), same P.
    """

    logits: Tensor
    boxes: Tensor
    valid: Tensor
    bins: BoxBins | None = None
    aux: list["Predictions"] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    @property
    def num_images(self) -> int:
        return self.logits.shape[0]

    @property
    def num_predictions(self) -> int:
        return self.logits.shape[1]

    def detach(self) -> "Predictions":
        """A copy whose tensors are plain constants (``clone`` also lifts inference-mode tensors)."""
        return _map_tensors(self, lambda t: t.detach().clone())

    def generated_anchors(self) -> list[Tensor] | None:
        """Per image (A_b, 4) xyxy the anchors a generator produced for these predictions (``detkd
        show`` draws them); None when nothing generated them (a dense grid, learned queries)."""
        return None

    def to(self, device) -> "Predictions":
        return _to(self, device)


@dataclass
class QueryCrossing:
    """The query state entering a decoder's last layer (training forwards; group 0 only), where
    CrossKD for query detectors crosses into a teacher's last layer.

    content: (B, Q, D) the content vectors the last layer reads (graph intermediates: gradients of
             a term on them reach the layers before; kept by reference, no copy).
    boxes:   (B, Q, 4) xyxy input pixels the last layer starts from (detached, as in the decoder).
    valid:   (B, Q) bool.
    """

    content: Tensor
    boxes: Tensor
    valid: Tensor

    @staticmethod
    def first_group(content: Tensor, boxes: Tensor, valid: Tensor, groups: Tensor | None) -> "QueryCrossing":
        """The state of group 0's queries (the inference group; groups never see each other)."""
        if groups is not None:
            keep = groups == 0
            content, boxes, valid = content[:, keep], boxes[:, keep], valid[:, keep]
        return QueryCrossing(content, boxes.detach(), valid)


@dataclass
class HeadStages:
    """Intermediate maps of a head built from conv towers (GFL), for head-crossing distillation
    (CrossKD: a student's stage-k maps continue through the teacher's blocks k.. and output convs).

    cls, reg: per stage k = 0..S, per FPN level (B, C, H_l, W_l); stage 0 is the tower's input (the
    FPN map), stage k the output of tower block k. They are the tensors the forward computed anyway
    (autograd holds them for the backward pass), so keeping references costs no memory.
    """

    cls: list[list[Tensor]]
    reg: list[list[Tensor]]

    @property
    def num_blocks(self) -> int:
        """S, the number of tower blocks."""
        return len(self.cls) - 1


@dataclass
class DenseOutputs(Predictions):
    """Predictions of a dense head on a location grid (GFL), with the grid itself.

    P = N = sum_l H_l * W_l locations, flattened level by level (P3 first), row-major.
    ``logits`` (B, N, C) are GFL's joint class-quality logits; ``bins.logits`` (B, N, 4, reg_max + 1)
    the per-edge bins in stride units from each location centre.

    points:      (N, 2) xy location centres in input pixels.
    strides:     (N,) float32 stride of each location.
    level_sizes: per level (H_l, W_l).
    stages:      the head's intermediate tower maps (:class:`HeadStages`) of a training forward, or
                 None; a detached copy never carries them.
    grid:        the grid convention of ``points`` and ``valid`` (``distill.ops.grid.GRIDS``).
    """

    points: Tensor = None  # type: ignore[assignment]  (always given; dataclass field order)
    strides: Tensor = None  # type: ignore[assignment]
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    stages: HeadStages | None = None
    grid: str = "centre"

    @property
    def reg_max(self) -> int:
        return self.bins.num_bins - 1

    @property
    def bin_logits(self) -> Tensor:
        """(B, N, 4, reg_max + 1)."""
        return self.bins.logits

    def level_counts(self) -> list[int]:
        return [h * w for h, w in self.level_sizes]

    def level_of(self, index: Tensor) -> Tensor:
        """(R,) flat location indices -> (R,) int64 FPN level of each."""
        ends = torch.tensor(self.level_counts(), device=index.device).cumsum(0)
        return torch.bucketize(index, ends, right=True)


def _map_tensors(obj, fn):
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, BoxBins):
            changes[f.name] = _map_tensors(value, fn)
        elif f.name == "aux":
            changes[f.name] = [_map_tensors(a, fn) for a in value]
        elif f.name in ("stages", "crossing"):  # graph intermediates of the student's own forward: not copied
            changes[f.name] = None
    return replace(obj, **changes)


# ---------------------------------------------------------------------------------------- matches
@dataclass
class Matches:
    """What a detector's loss matched: per image, rows (prediction index, GT index, weight).

    pred_index: B tensors (M_b,) int64 prediction indices (dense: locations; sparse: queries).
    gt_index:   B tensors (M_b,) int64 index into that image's ``Target.boxes``.
    weight:     B tensors (M_b,) float32 detached per-match weight the loss used (GFL: the quality
                weight, max class sigmoid; Query Weighting: the positive weight), or None.
    extras:     named per-image tensors, e.g. ``"pos_thresholds"``: B tensors (G_b,) — the ATSS
                IoU threshold of each GT, which the VLR region needs.
    aux:        the matches of each auxiliary head / earlier stage, in ``Predictions.aux`` order
                (a DETR-style criterion matches every head on its own).

    A dense assigner gives a GT many predictions; a Hungarian matcher at most one, and each
    prediction appears at most once per image in both cases.
    """

    pred_index: list[Tensor]
    gt_index: list[Tensor]
    weight: list[Tensor] | None = None
    extras: dict[str, list[Tensor]] = field(default_factory=dict)
    aux: list["Matches"] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.pred_index)

    def positive_mask(self, num_predictions: int) -> Tensor:
        """(B, P) bool: the matched predictions."""
        mask = torch.zeros(self.num_images, num_predictions, dtype=torch.bool, device=self._device())
        for b, index in enumerate(self.pred_index):
            mask[b, index] = True
        return mask

    def scatter(self, values: list[Tensor], num_predictions: int, fill: float = 0.0) -> Tensor:
        """Per-image (M_b, ...) values at the matched predictions -> (B, P, ...), ``fill`` elsewhere."""
        tail = values[0].shape[1:] if values else ()
        dtype = values[0].dtype if values else torch.float32
        out = torch.full((self.num_images, num_predictions, *tail), fill, dtype=dtype, device=self._device())
        for b, (index, v) in enumerate(zip(self.pred_index, values)):
            out[b, index] = v
        return out

    def weight_map(self, num_predictions: int) -> Tensor:
        """(B, P) float32 match weight (1 where no weight is given), 0 at unmatched predictions."""
        weights = self.weight if self.weight is not None else [torch.ones(len(i), device=i.device) for i in self.pred_index]
        return self.scatter([w.to(compute_dtype()) for w in weights], num_predictions)

    def _device(self) -> torch.device:
        return self.pred_index[0].device if self.pred_index else torch.device("cpu")

    def to(self, device) -> "Matches":
        return _to(self, device)


# ------------------------------------------------------------------------------------------ pairs
@dataclass
class Pairs:
    """Rows a distillation loss compares: student prediction ``student[r]`` of image ``image[r]``
    with teacher prediction ``teacher[r]`` of the same image, weighted by ``weight[r]``.

    image, student, teacher: (R,) int64; weight: (R,) float32 > 0.
    space: what the indices index — ``"predictions"`` (rows of Predictions) or ``"features"``
           (flattened FPN locations, level by level, row-major).
    mask:  (B, N) float, for pairs made from a dense region (student index = teacher index): the
           region's weight map they came from, so grid losses can skip a gather when it selects
           everything, and legacy per-level normalisers can count per level. None otherwise.
    """

    image: Tensor
    student: Tensor
    teacher: Tensor
    weight: Tensor
    num_images: int
    space: Literal["predictions", "features"] = "predictions"
    mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @staticmethod
    def from_mask(mask: Tensor, space: Literal["predictions", "features"] = "predictions") -> "Pairs":
        """A dense (B, N) weight map -> pairs at its non-zero entries, batch-major, index ascending."""
        image, index = (mask > 0).nonzero(as_tuple=True)
        return Pairs(image, index, index, mask[image, index].to(compute_dtype()), mask.shape[0], space, mask)

    @staticmethod
    def empty(num_images: int, device, space: Literal["predictions", "features"] = "predictions") -> "Pairs":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return Pairs(z, z, z, torch.zeros(0, device=device), num_images, space)

    def select(self, keep: Tensor) -> "Pairs":
        """The rows where ``keep`` (R,) bool is True (order kept; ``mask`` dropped)."""
        return Pairs(self.image[keep], self.student[keep], self.teacher[keep], self.weight[keep], self.num_images, self.space)

    def reweight(self, weight: Tensor) -> "Pairs":
        """Same rows with new weights (R,), rows whose weight is not > 0 dropped."""
        return replace(self, weight=weight, mask=None).select(weight > 0)


# -------------------------------------------------------------------------------------- detectors
@dataclass(frozen=True)
class DetectorSpec:
    """What pair checks know about a detector, before any batch runs.

    family:       ``"dense"`` (predictions on the FPN location grid) or ``"sparse"`` (queries).
    num_classes:  C (after a teacher's class mapping).
    strides:      FPN strides of the feature maps ``features`` returns.
    fpn_channels: channels of every FPN map (None when they differ per level).
    bins:         K, bins per edge of a distribution box head, or None (no distributions).
    query_boxes:  the detector's decoder can run on given query boxes (``decode_queries``), so a
                  teacher's boxes can be fed to it as shared distillation queries (KD-DETR).
    head_stages:  S, the blocks of each conv tower of a head that can be crossed (``HeadStages`` in
                  its outputs, ``head_from_stage`` to continue from a stage; CrossKD), or None.
    query_crossing: a query detector whose decoder can be crossed (CrossKD for queries): its training
                  predictions carry the query state entering its last decoder layer
                  (``SparsePredictions.crossing``, content that is not constant) and it finishes a
                  decoder from such a state (``crossing_context`` / ``finish_from_crossing``).
    grid:         the convention of the dense location grid on its FPN maps (``distill.ops.grid.GRIDS``):
                  where a cell's point sits and which cells are valid; dense pairs need the same one.
    """

    family: Literal["dense", "sparse"]
    num_classes: int
    strides: tuple[int, ...]
    fpn_channels: int | None
    bins: int | None = None
    query_boxes: bool = False
    head_stages: int | None = None
    query_crossing: bool = False
    grid: str = "centre"


@dataclass
class Detections:
    """Post-processed detections of one image in input pixels.

    boxes: (K, 4) xyxy; scores: (K,); labels: (K,) int64.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def to(self, device) -> "Detections":
        return _to(self, device)
