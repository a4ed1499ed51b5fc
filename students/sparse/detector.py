"""What every query detector of the sparse family shares: the contract around its decoder.

:class:`QueryDetector` implements ``spec``, ``loss``, ``match``, ``postprocess`` and ``forward`` of the
detector contract (``distill.detector``) once, for any decoder that returns
:class:`SparsePredictions` (main head + ``aux`` heads, the queries they started from). A model
(``roi_detector.SparseDetector``, ``dab_detr.DABDETR``) provides ``features``, ``head``,
``decode_queries``, ``aux_names`` and ``finish_from_crossing``, and calls :meth:`QueryDetector.set_postprocess`; it sets
``num_classes``, ``strides``, ``width``, ``box`` (:class:`~students.sparse.config.BoxHeadConfig`),
``criterion`` and ``query_source`` (a :class:`~students.sparse.queries.QuerySource`). The
post-processing settings stay plain attributes (``max_detections``, ``score_thresh``, ``nms_iou``)
that callers may change on a built model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.structures import Detections, DetectorSpec, Matches, Predictions, QueryCrossing, Target
from students.sparse.config import BoxHeadConfig, LossConfig, PostprocessConfig
from students.sparse.criterion import SetCriterion
from students.sparse.matcher import HungarianMatcher
from students.sparse.postprocess import postprocess_sparse
from students.sparse.queries import Queries, QuerySource

__all__ = ["QueryDetector", "SparsePredictions", "QueryCrossing", "first_group", "build_criterion"]


@dataclass
class SparsePredictions(Predictions):
    """Predictions plus the queries they started from (``queries.extras`` feeds the source's loss)
    and, in training, the state entering the last decoder layer (``crossing``)."""

    queries: Queries | None = None
    crossing: QueryCrossing | None = None

    def detach(self) -> "SparsePredictions":
        out = super().detach()
        if self.queries is not None:
            q = self.queries
            lift = lambda t: t.detach().clone() if isinstance(t, Tensor) else t  # noqa: E731
            out.queries = Queries(lift(q.boxes), lift(q.valid), lift(q.content), lift(q.groups), {k: lift(v) for k, v in q.extras.items()})
        return out

    def generated_anchors(self) -> list[Tensor] | None:
        """The valid query boxes of each image when a generator made them (``extras["anchors"]``)."""
        if self.queries is None or "anchors" not in self.queries.extras:
            return None
        return [boxes[valid] for boxes, valid in zip(self.queries.boxes, self.queries.valid)]


def build_criterion(loss: LossConfig) -> SetCriterion:
    """The family's set criterion from its loss options (matching cost 2 / 5 / 2 from the same weights)."""
    matcher = HungarianMatcher(loss.cls_weight, loss.l1_weight, loss.giou_weight, area_weight=loss.area_weight)
    return SetCriterion(
        matcher, loss.cls_weight, loss.l1_weight, loss.giou_weight, loss.dfl_weight,
        query_weighting=loss.query_weighting, area_weight=loss.area_weight,
    )


class QueryDetector(nn.Module):
    """Base of the sparse family's detectors (see the module docstring)."""

    family = "sparse"
    num_classes: int
    strides: tuple[int, ...]
    width: int
    box: BoxHeadConfig
    criterion: SetCriterion
    query_source: QuerySource  # its loss() terms join the detector's
    max_detections: int
    score_thresh: float
    nms_iou: float | None

    def set_postprocess(self, post: PostprocessConfig) -> None:
        self.max_detections, self.score_thresh, self.nms_iou = post.max_detections, post.score_thresh, post.nms_iou

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec("sparse", self.num_classes, self.strides, self.width, self.box.bins, query_boxes=True,
                            query_crossing=self.crossable)

    @property
    def crossable(self) -> bool:
        """Whether the content entering the last decoder layer depends on the image (``spec.query_crossing``)."""
        return True

    def crossing_context(self, features: list[Tensor], image_sizes: Tensor) -> list[Tensor]:
        """What :meth:`finish_from_crossing` reads of a batch besides the queries (the FPN maps by default)."""
        return list(features)

    def finish_from_crossing(self, context: list[Tensor], image_sizes: Tensor, content: Tensor, boxes: Tensor, valid: Tensor) -> Predictions:
        """The main path's last decoder layer and heads on a given query state: content (B, Q, D),
        boxes (B, Q, 4) xyxy px, valid (B, Q); ``context`` from :meth:`crossing_context`. Queries
        attend to each other only (one group). -> Predictions (B, Q)."""
        raise NotImplementedError

    @property
    def fpn_channels(self) -> int:  # the name the RoI models and older code use for the width
        return self.width

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> SparsePredictions:
        return self.head(self.features(images), image_sizes)

    def aux_names(self, count: int) -> list[str]:
        raise NotImplementedError

    def loss(self, predictions: SparsePredictions, targets: list[Target], image_sizes: Tensor | None) -> tuple[dict[str, Tensor], Matches]:
        """Weighted terms of every head (each with its own Hungarian matching), the query source's own
        terms, and the main head's matches (``Matches.aux``: each aux head's own, in ``predictions.aux``
        order; group 0 only with groups)."""
        image_sizes = self._sizes_from(predictions, image_sizes)
        queries = predictions.queries
        groups = queries.groups if queries is not None else None
        losses, matches = self.criterion(predictions, targets, image_sizes, groups, self.aux_names(len(predictions.aux)))
        if queries is not None:
            losses.update(self.query_source.loss(queries, targets, image_sizes))
        return losses, first_group(matches, groups)

    @torch.no_grad()
    def match(self, predictions: SparsePredictions, targets: list[Target], image_sizes: Tensor | None) -> Matches:
        """The main head's Hungarian matching alone (group 0 when groups are present)."""
        image_sizes = self._sizes_from(predictions, image_sizes)
        queries = predictions.queries
        groups = queries.groups if queries is not None else None
        targets = [t.to(predictions.logits.device) for t in targets]
        return first_group(self.criterion.matcher(predictions, targets, image_sizes, groups), groups)

    def postprocess(self, predictions: Predictions, image_sizes: Tensor | None) -> list[Detections]:
        return postprocess_sparse(predictions, image_sizes, self.max_detections, self.score_thresh, self.nms_iou)

    # --------------------------------------------------------------------------------- helpers
    def _sizes(self, features: list[Tensor], image_sizes: Tensor | None) -> Tensor:
        """(B, 2) image sizes; None = every image fills the canvas of the finest map."""
        if image_sizes is not None:
            return image_sizes.to(features[0].device)
        h, w = features[0].shape[-2] * self.strides[0], features[0].shape[-1] * self.strides[0]
        return torch.tensor([[h, w]] * features[0].shape[0], device=features[0].device)

    def _sizes_from(self, predictions: Predictions, image_sizes: Tensor | None) -> Tensor:
        if image_sizes is not None:
            return image_sizes.to(predictions.logits.device)
        raise ValueError("sparse losses need image_sizes (boxes are normalised by the image size)")


def first_group(matches: Matches, groups: Tensor | None) -> Matches:
    """Matches restricted to group 0 (the inference group), so each GT has one prediction."""
    if groups is None:
        return matches
    keep = [groups[i] == 0 for i in matches.pred_index]
    weight = None if matches.weight is None else [w[k] for w, k in zip(matches.weight, keep)]
    aux = [first_group(a, groups) for a in matches.aux]
    return Matches([i[k] for i, k in zip(matches.pred_index, keep)], [g[k] for g, k in zip(matches.gt_index, keep)], weight, aux=aux)
