"""Shared distillation queries (KD-DETR): the teacher's boxes become extra queries of the student.

The student's decoder is run once more, on the teacher's ``top_k`` most confident boxes (a sparse
teacher's valid queries, a dense teacher's after class-agnostic NMS), as a query group isolated from
its own queries (``decode_queries``); student query k then corresponds to teacher prediction k by
construction, with no matching. Training only: inference is unchanged. Pairs are weighted by the
teacher's confidence ``max_c p_t``. The engine (``Distiller.step``) runs the extra decoder pass; this
pairer chooses the boxes and pairs the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.ops.precision import compute_dtype
from distill.pairers.base import Pairer
from distill.pairers.matched import teacher_candidates
from distill.structures import DetectorSpec, Pairs, Target


@dataclass(frozen=True)
class SharedQueriesPairer(Pairer):
    top_k: int = 50
    nms_iou: float = 0.7

    name = "shared_queries"
    spaces = ("predictions",)
    teacher_needs = frozenset({"head"})
    shared_student = True

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ConfigError(f"pairer 'shared_queries': top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.nms_iou, (int, float)) and math.isfinite(self.nms_iou) and 0 < self.nms_iou <= 1):
            raise ConfigError(f"pairer 'shared_queries': nms_iou must be in (0, 1], got {self.nms_iou!r}")

    def check(self, student: DetectorSpec, teacher: DetectorSpec, space: str) -> None:
        super().check(student, teacher, space)
        if not student.query_boxes:
            raise ConfigError(
                f"pairer 'shared_queries' feeds the teacher's boxes to the student's decoder, but the student ({student.family}) "
                "cannot start from given boxes (decode_queries); use gt_bridged or teacher_set"
            )

    @torch.no_grad()
    def teacher_queries(self, teacher: DistillInputs) -> tuple[Tensor, Tensor, Tensor]:
        """The boxes to share: (B, K, 4) xyxy px, valid (B, K) bool, teacher index (B, K) int64 (-1 = padding).

        Per image the ``top_k`` most confident candidates, by decreasing confidence.
        """
        preds = teacher.require_predictions("boxes")
        chosen = []
        for b in range(preds.num_images):
            index = teacher_candidates(preds, b, self.top_k, self.nms_iou)
            score = preds.logits[b, index].to(compute_dtype()).sigmoid().amax(dim=-1)
            chosen.append(index[score.argsort(descending=True, stable=True)][: self.top_k])
        k = max(1, max(len(c) for c in chosen))
        index = torch.full((preds.num_images, k), -1, dtype=torch.long, device=preds.logits.device)
        for b, c in enumerate(chosen):
            index[b, : len(c)] = c
        valid = index >= 0
        boxes = preds.boxes.detach().to(compute_dtype()).gather(1, index.clamp(min=0)[..., None].expand(-1, -1, 4))
        return boxes, valid, index

    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        """``student``: the side the student's decoder produced on :meth:`teacher_queries`' boxes."""
        _, valid, index = self.teacher_queries(teacher)
        image, k = valid.nonzero(as_tuple=True)
        t_index = index[image, k]
        weight = teacher.predictions.logits[image, t_index].detach().to(compute_dtype()).sigmoid().amax(dim=-1)
        return Pairs(image, k, t_index, weight, valid.shape[0])

    def __str__(self) -> str:
        return f"shared_queries(top_k={self.top_k})"
