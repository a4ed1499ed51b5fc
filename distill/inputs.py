"""One side of a distillation step — what the pairers and losses may read of a student or teacher.

Losses never index tensors themselves: they read rows through the accessors below with the
(image, index) columns of :class:`~distill.structures.Pairs`, each side with its own index. A
teacher served from a cache is another provider of the same accessors
(:class:`teachers.cache.CachedTeacherInputs`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.ops.grid import dense_points, valid_locations
from distill.structures import DenseOutputs, DetectorSpec, Matches, Predictions


@dataclass
class DistillInputs:
    """What one side (student or teacher) offers to pairers and losses.

    spec:        the detector's :class:`DetectorSpec` (family, classes, strides, bins, channels).
    predictions: head outputs, for losses with ``"head"`` in ``needs`` and for matched pairers.
    features:    FPN maps, per level (B, C_l, H_l, W_l), for losses with ``"features"``.
    matches:     what this side's loss (student) or matcher (teacher, when a pairer asks) matched.
    image_sizes: (B, 2) (height, width) inside the padding, None = images fill the canvas.
    head_tail:   (teacher, for losses that need ``"head_tail"``) ``fn(stage, cls_maps, reg_maps) ->
                 (class logits (B, N, C) | None, bin logits (B, N, 4, K) | None)``: the teacher's
                 head finished from tower stage ``stage`` on the given per-level maps, with
                 gradients to the maps (CrossKD).
    decode:      (teacher, for pairers and losses that need ``"decode"``) ``fn(boxes (B, K, 4) xyxy px,
                 valid (B, K)) -> Predictions``: the teacher's decoder run on given query boxes,
                 detached, classes mapped to the student's (KD-DETR's distillation points through
                 both decoders); :meth:`decoded` runs it once per boxes tensor.
    decoder_tail: (teacher, for losses that need ``"decoder_tail"``) ``fn(content (B, Q, D), boxes
                 (B, Q, 4) xyxy px, valid (B, Q)) -> Predictions``: the teacher's last decoder layer
                 and heads on a given query state, with gradients to ``content`` (CrossKD for queries).
    """

    spec: DetectorSpec | None = None
    predictions: Predictions | None = None
    features: list[Tensor] | None = None
    matches: Matches | None = None
    image_sizes: Tensor | None = None
    head_tail: Callable[..., tuple[Tensor | None, Tensor | None]] | None = None
    decode: Callable[[Tensor, Tensor], Predictions] | None = None
    decoder_tail: Callable[[Tensor, Tensor, Tensor], Predictions] | None = None
    _cache: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ----------------------------------------------------------------------------- prediction rows
    def cls_rows(self, image: Tensor, index: Tensor) -> Tensor:
        """(R,) image and prediction indices -> (R, C) class logits."""
        return self.require_predictions("class logits").logits[image, index]

    def bin_rows(self, image: Tensor, index: Tensor) -> Tensor:
        """(R,) indices -> (R, 4, K) per-edge bin logits."""
        return self._bins("box-bin logits").logits[image, index]

    def bin_references(self, image: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """(R,) indices -> centres (R, 2) and per-edge spacing (R, 4) the bins are measured in."""
        _, centers, spacing = self._bins("box-bin references").rows(image, index)
        return centers, spacing

    def box_rows(self, image: Tensor, index: Tensor) -> Tensor:
        """(R,) indices -> (R, 4) xyxy boxes in input pixels."""
        return self.require_predictions("boxes").boxes[image, index]

    def match_weights(self) -> Tensor:
        """(B, P) float32 weight of every matched prediction (GFL: its quality weight), 0 elsewhere."""
        if "match_weights" not in self._cache:
            if self.matches is None:
                raise ValueError("this loss reads match weights, but DistillInputs.matches is None")
            self._cache["match_weights"] = self.matches.weight_map(self.require_predictions("matches").num_predictions)
        return self._cache["match_weights"]

    def decoded(self, boxes: Tensor, valid: Tensor) -> Predictions:
        """``decode(boxes, valid)``, computed once for a given ``boxes`` tensor: the pairer and every
        term of a step that read the teacher's decoder on the same boxes share one run."""
        if self.decode is None:
            raise ValueError("this term reads the teacher's decoder on given boxes, but this teacher side cannot run it (a cache?)")
        cached = self._cache.get("decoded")
        if cached is None or cached[0] is not boxes:
            cached = (boxes, self.decode(boxes, valid))
            self._cache["decoded"] = cached
        return cached[1]

    # -------------------------------------------------------------------------------- feature rows
    def feature_rows(self, level: int, image: Tensor | None, index: Tensor | None) -> Tensor:
        """Feature vectors of FPN level ``level`` -> (R, C_l).

        image, index: (R,) image and location (within the level, row-major); both None = every
        location of every image, image-major (no gather).
        """
        rows = self.require_features()[level].flatten(2).transpose(1, 2)  # (B, HW, C)
        if index is None:
            return rows.reshape(-1, rows.shape[-1])
        return rows[image, index]

    def feature_sizes(self) -> list[tuple[int, int]]:
        """(H_l, W_l) of every FPN level."""
        return [(f.shape[-2], f.shape[-1]) for f in self.require_features()]

    # ------------------------------------------------------------------------------------- grids
    def grid(self, space: str) -> tuple[Tensor, Tensor, Tensor]:
        """The dense location grid of ``space``: points (N, 2), strides (N,), valid (B, N).

        ``"predictions"``: a dense head's own grid. ``"features"``: the FPN maps' grid (for a
        dense head the same grid; for a sparse detector built from its strides).
        """
        preds = self.predictions
        if space == "predictions" or (isinstance(preds, DenseOutputs) and self.features is not None and preds.level_sizes == self.feature_sizes()):
            if not isinstance(preds, DenseOutputs):
                raise ValueError("this pairer reads a dense location grid, but the predictions are not DenseOutputs")
            return preds.points, preds.strides, preds.valid
        if self.spec is None:
            raise ValueError("the FPN grid needs DistillInputs.spec (strides)")
        sizes = tuple(tuple(s) for s in self.feature_sizes())
        device = self.require_features()[0].device
        points, strides = dense_points(sizes, tuple(self.spec.strides[: len(sizes)]), device, self.spec.grid)
        return points, strides, valid_locations(points, self.image_sizes, self.require_features()[0].shape[0], self.spec.grid)

    # ----------------------------------------------------------------------------------- helpers
    def _bins(self, what: str):
        bins = self.require_predictions(what).bins
        if bins is None:
            raise ValueError(f"this loss reads {what}, but the predictions have no box distributions")
        return bins

    def require_predictions(self, what: str) -> Predictions:
        """The head outputs, or a ValueError naming what the calling loss wanted from them."""
        if self.predictions is None:
            raise ValueError(f"this loss reads {what}, but DistillInputs.predictions is None (teacher head not run?)")
        return self.predictions

    def require_features(self) -> list[Tensor]:
        """The FPN maps, or a ValueError when this side was run without them."""
        if self.features is None:
            raise ValueError("this loss reads FPN features, but DistillInputs.features is None")
        return self.features


def level_offsets(sizes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """(L + 1,) int64 start of every level in the flattened grid, and the total at the end."""
    counts = torch.tensor([0] + [h * w for h, w in sizes], device=device)
    return counts.cumsum(0)
