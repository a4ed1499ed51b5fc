"""A frozen detector plus a box refiner, speaking the detector contract (``distill.detector``).

``RefinedDetector`` is what ``detkd refine`` trains and what ``load_detector`` returns for a
refined run, so ``detkd eval``, ``predict``, ``cache`` and ``distill --teacher`` take it like any
detector. The detector is frozen (``teachers.frozen.freeze``: eval mode pinned, no gradients) and
held as a plain attribute, not a submodule: ``parameters()``, ``state_dict()``, the optimizer, DDP
and the checkpoint see the refiner alone; ``.to()`` still moves both.

Where the refiner acts:

- training (``head`` with targets): the detector's own matching of its predictions to the GT
  (``detector.match``) picks the rows to refine. For a sparse detector that is its Hungarian
  matcher (``students/sparse/matcher.py``, cost 2 / 5 / 2 on the last layer, group 0 under Group
  DETR), as in the reference. For a dense detector it is its label assignment (GFL: ATSS): the
  positives are the locations the detector learned to regress each GT from, and its NMS survivors
  at inference are such locations; a one-to-one matching would pick one arbitrary location per GT.
- inference, sparse: the top-K queries by max class score are refined in ``head`` and scattered
  back, the rest unchanged; ``postprocess`` is the detector's. A refined sparse teacher therefore
  hands its refined boxes to every box target (box KD, teacher-set pairs, shared queries).
- inference, dense: the refiner sits after the detector's NMS, in ``postprocess``: the top-K
  detections by score are refined. Before NMS the top-K locations are mostly duplicates of a few
  objects. The dense head's outputs (per-edge distributions) are the detector's, so a refined dense
  teacher teaches what the unrefined one does; the distill run's metadata says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass, replace
from functools import cache

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from distill.structures import Detections, DetectorSpec, Matches, Predictions, Target
from teachers.frozen import freeze
from teachers.refine.criterion import RefineCriterion, refined_rows, zero_losses
from teachers.refine.refiner import BoxRefiner

__all__ = ["RefinedDetector", "RefinedRows", "top_k_rows", "scatter_rows", "box_targets"]

# Attributes of the detector the engine, the teacher checks and the export graph read, passed through unchanged.
_PASSED = ("num_classes", "strides", "head_from_stage", "grid_matches", "matching_config", "max_detections", "score_thresh", "nms_iou", "pre_nms_topk")


@dataclass
class RefinedRows:
    """The rows a training forward refined: image (R,), prediction index (R,), GT boxes (R, 4) xyxy
    px, the image size of each row (R, 2), and the boxes after each step (steps x (R, 4))."""

    image: Tensor
    index: Tensor
    gt: Tensor
    image_sizes: Tensor
    steps: list[Tensor]


class CarriesRefinement:
    """Marker of the Predictions a RefinedDetector's head returns (``_carrying``): declared fields
    ``refiner_maps``, ``refined`` and ``matches``, read by type, never probed with getattr."""

    refiner_maps: list | None
    refined: RefinedRows | None
    matches: Matches | None


@cache
def _carrying(cls: type) -> type:
    """``cls`` (a Predictions type) with two more fields: the refiner's maps (dense inference reads
    them in ``postprocess``) and the refined rows of a training forward (``loss`` reads them)."""
    return make_dataclass(
        f"Refined{cls.__name__}",
        [("refiner_maps", "list | None", field(default=None)), ("refined", "RefinedRows | None", field(default=None)),
         ("matches", "Matches | None", field(default=None))],
        bases=(cls, CarriesRefinement),
    )


def _carry(predictions: Predictions, **extra) -> Predictions:
    values = {f.name: getattr(predictions, f.name) for f in fields(predictions)}
    return _carrying(type(predictions))(**values, **extra)


def top_k_rows(scores: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best valid predictions of each image.

    scores (B, P), valid (B, P) bool -> index (B, K) int64 (K = min(k, P)), keep (B, K) bool: False
    where an image has fewer than K valid predictions (those rows are never refined).
    """
    num = min(k, scores.shape[1])
    masked = scores.masked_fill(~valid, float("-inf"))
    top, index = masked.topk(num, dim=1)
    return index, torch.isfinite(top) & valid.gather(1, index)


def scatter_rows(boxes: Tensor, index: Tensor, keep: Tensor, refined: Tensor) -> Tensor:
    """boxes (B, P, 4) with rows ``index`` (B, K) replaced by ``refined`` (B, K, 4) where ``keep``."""
    index4 = index[..., None].expand(-1, -1, 4)
    new = torch.where(keep[..., None], refined.to(boxes.dtype), boxes.gather(1, index4))
    return boxes.scatter(1, index4, new)


def box_targets(family: str) -> str:
    """What a refined teacher of this family hands to box targets (the distill run's metadata)."""
    if family == "sparse":
        return "refined: the top-K queries' boxes of the teacher's head are refined"
    return "unrefined: a dense teacher's head outputs are its detector's; the refiner acts after NMS only"


class RefinedDetector(nn.Module):
    """``detector`` (frozen here) + ``refiner`` (trainable), ``steps`` refinement steps, ``top_k``
    predictions refined at inference."""

    def __init__(self, detector: nn.Module, refiner: BoxRefiner, steps: int = 3, top_k: int = 100) -> None:
        super().__init__()
        self.__dict__["detector"] = freeze(detector)  # not a submodule: see the module docstring
        self.refiner = refiner
        self.steps = steps
        self.top_k = top_k
        self.criterion = RefineCriterion()

    def __getattr__(self, name: str):
        if name in _PASSED:
            return getattr(self.__dict__["detector"], name)
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .double() move the detector too
        self.detector._apply(fn)
        return super()._apply(fn, recurse)

    @property
    def family(self) -> str:
        return self.detector.family

    @property
    def config(self) -> dict:
        return self.detector.config

    @property
    def spec(self) -> DetectorSpec:
        # no crossing: a decoder finished from another's state would skip the refiner the boxes are meant to come from
        return replace(self.detector.spec, query_crossing=False)

    # ------------------------------------------------------------------------------ contract
    def features(self, images: Tensor) -> list[Tensor]:
        """The frozen detector's maps (the refiner's FPN runs on them in ``head``)."""
        with torch.no_grad():
            return self.detector.features(images)

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets: list[Target] | None = None) -> Predictions:
        """The detector's predictions (never given the targets: it is frozen), with

        - training (``targets`` given): the matched predictions refined, carried for ``loss``;
        - inference, sparse: the top-K queries' boxes refined; dense: the refiner's maps carried for
          ``postprocess``.
        """
        sizes = self._sizes(features, image_sizes)
        with torch.no_grad():
            base = self.detector.head(features, image_sizes)
        maps = self.refiner.maps(features)
        if self.training and targets is not None:
            with torch.no_grad():
                matches = self.detector.match(base, targets, sizes)
            return _carry(base, refined=self._refine_matched(maps, base, matches, targets, sizes), matches=matches)
        if self.family == "sparse":
            return replace(base, boxes=self._refine_top_k(maps, base.boxes, base.logits.amax(dim=-1), base.valid, sizes))
        return _carry(base, refiner_maps=maps)

    def loss(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> tuple[dict[str, Tensor], Matches]:
        rows = predictions.refined if isinstance(predictions, CarriesRefinement) else None
        if rows is None:
            raise ValueError("RefinedDetector.loss needs the predictions of a training head call (targets given)")
        normaliser = refined_rows(len(rows.index), rows.gt.device)  # every rank, every step (a collective)
        if len(rows.index) == 0:
            return zero_losses(sum(p.sum() for p in self.refiner.parameters())), predictions.matches
        return self.criterion(rows.steps, rows.gt, rows.image_sizes, normaliser), predictions.matches

    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> Matches:
        return self.detector.match(predictions, targets, image_sizes)

    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]:
        detections = self.detector.postprocess(predictions, image_sizes)
        if self.family == "sparse":
            return detections  # refined in head
        maps = predictions.refiner_maps if isinstance(predictions, CarriesRefinement) else None
        if maps is None:
            raise ValueError("RefinedDetector.postprocess needs the predictions of this model's head (the refiner's maps)")
        return self._refine_detections(maps, detections, image_sizes)

    def refine_exported(self, predictions: Predictions, boxes: Tensor, scores: Tensor, valid: Tensor, image_sizes: Tensor) -> Tensor:
        """Dense: the export graph's detections after its NMS, padded (``boxes`` (B, D, 4), ``scores``
        and ``valid`` (B, D)), with their top-K refined as ``postprocess`` refines them -> (B, D, 4).
        (A sparse detector's refinement is in ``head``, so its export graph needs no call.)"""
        return self._refine_top_k(predictions.refiner_maps, boxes, scores, valid, image_sizes)

    def decode_queries(self, features: list[Tensor], image_sizes: Tensor | None, boxes: Tensor, valid: Tensor, aux: bool = True) -> Predictions:
        """The detector's decoder on given boxes (shared queries), its top-K outputs refined."""
        sizes = self._sizes(features, image_sizes)
        with torch.no_grad():
            out = self.detector.decode_queries(features, image_sizes, boxes, valid, aux=aux)
        maps = self.refiner.maps(features)
        return replace(out, boxes=self._refine_top_k(maps, out.boxes, out.logits.amax(dim=-1), out.valid, sizes))

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> Predictions:
        return self.head(self.features(images), image_sizes)

    # ------------------------------------------------------------------------------ helpers
    def _sizes(self, features: list[Tensor], image_sizes: Tensor | None) -> Tensor:
        """(B, 2) image sizes; None = every image fills the canvas of the finest map."""
        if image_sizes is not None:
            return image_sizes.to(features[0].device)
        stride = self.refiner.strides[0]
        h, w = features[0].shape[-2] * stride, features[0].shape[-1] * stride
        return torch.tensor([[h, w]] * features[0].shape[0], device=features[0].device)

    def _refine_top_k(self, maps: list[Tensor], boxes: Tensor, scores: Tensor, valid: Tensor, sizes: Tensor) -> Tensor:
        if boxes.shape[1] == 0:
            return boxes
        index, keep = top_k_rows(scores, valid, self.top_k)
        chosen = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        return scatter_rows(boxes, index, keep, self.refiner(maps, chosen, sizes, self.steps)[-1])

    def _refine_matched(self, maps: list[Tensor], base: Predictions, matches: Matches, targets: list[Target], sizes: Tensor) -> RefinedRows:
        """Refine each image's matched predictions, padded to the most matches of an image."""
        device = base.boxes.device
        counts = [len(i) for i in matches.pred_index]
        width = max(counts, default=0)
        image = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)]) if counts else torch.zeros(0, dtype=torch.long, device=device)
        index = torch.cat([i.to(device) for i in matches.pred_index]) if counts else image.clone()
        gt = torch.cat([t.boxes.to(device)[g.to(device)] for t, g in zip(targets, matches.gt_index)]) if counts else base.boxes.new_zeros(0, 4)
        if width == 0:
            return RefinedRows(image, index, gt, sizes[image], [])
        slot = torch.cat([torch.arange(n, device=device) for n in counts])
        padded = base.boxes.new_zeros(base.num_images, width, 4)
        padded[:, :, 2:] = 1.0  # a unit box in the padding: RoIAlign reads it harmlessly, no loss reads it
        padded[image, slot] = base.boxes[image, index]
        steps = [b[image, slot] for b in self.refiner(maps, padded, sizes, self.steps)]
        return RefinedRows(image, index, gt, sizes[image], steps)

    def _refine_detections(self, maps: list[Tensor], detections: list[Detections], sizes: Tensor) -> list[Detections]:
        """Each image's top-K detections by score refined: the images' detections padded to the most
        of any image and refined as a sparse head's queries are (``_refine_top_k``; padding never chosen)."""
        if not any(len(d.scores) for d in detections):
            return detections
        counts = torch.tensor([len(d.scores) for d in detections], device=maps[0].device)
        boxes = pad_sequence([d.boxes for d in detections], batch_first=True)  # (B, N, 4)
        scores = pad_sequence([d.scores for d in detections], batch_first=True)  # (B, N)
        valid = torch.arange(scores.shape[1], device=scores.device)[None] < counts[:, None]
        refined = self._refine_top_k(maps, boxes, scores, valid, sizes.to(boxes.device))
        return [Detections(refined[b, : len(d.scores)], d.scores, d.labels) for b, d in enumerate(detections)]
