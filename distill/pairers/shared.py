"""Shared distillation queries (KD-DETR): the teacher's boxes become extra queries of the student.

The student's decoder is run once more, on the teacher's ``top_k`` most confident boxes (a sparse
teacher's valid queries, a dense teacher's after class-agnostic NMS), as a query group isolated from
its own queries (``decode_queries``); student query k then corresponds to teacher prediction k by
construction, with no matching. Training only: inference is unchanged. Pairs are weighted by the
teacher's confidence ``max_c p_t``. The engine (``Distiller.step``) runs the extra decoder pass; this
pairer chooses the boxes and pairs the rows.

``random: R`` adds KD-DETR's *general* distillation points: R random boxes per step, the same for
every image of the batch, drawn as KD-DETR draws them (an ``nn.Embedding``'s N(0, 1) weights through a
sigmoid, normalised cx, cy, w, h, so centred on the image with a wide spread of sizes). A random box
has no teacher prediction of its own, so then *both* decoders run on every point (teacher boxes and
random ones) and student query k is paired with the teacher's decoder output on the same point k,
weighted by that output's ``max_c p_t`` (a query detector teacher only; no cache holds this).
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
    random: int = 0

    name = "shared_queries"
    spaces = ("predictions",)
    shared_student = True

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ConfigError(f"pairer 'shared_queries': top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.random, int) and not isinstance(self.random, bool) and self.random >= 0):
            raise ConfigError(f"pairer 'shared_queries': random must be an integer >= 0 (random boxes per step), got {self.random!r}")
        if not (isinstance(self.nms_iou, (int, float)) and math.isfinite(self.nms_iou) and 0 < self.nms_iou <= 1):
            raise ConfigError(f"pairer 'shared_queries': nms_iou must be in (0, 1], got {self.nms_iou!r}")

    @property
    def teacher_decodes(self) -> bool:
        """Whether the teacher's decoder also runs on the points (with random points: KD-DETR)."""
        return self.random > 0

    @property
    def teacher_needs(self) -> frozenset[str]:
        return frozenset({"head", "decode"}) if self.teacher_decodes else frozenset({"head"})

    @property
    def cache_refusal(self) -> str | None:
        return "runs the teacher's decoder on random boxes at every step, which no cache can hold" if self.teacher_decodes else None

    def check(self, student: DetectorSpec, teacher: DetectorSpec, space: str) -> None:
        super().check(student, teacher, space)
        if not student.query_boxes:
            raise ConfigError(
                f"pairer 'shared_queries' feeds the teacher's boxes to the student's decoder, but the student ({student.family}) "
                "cannot start from given boxes (decode_queries); use gt_bridged or teacher_set"
            )
        if self.teacher_decodes and not teacher.query_boxes:
            raise ConfigError(
                f"pairer 'shared_queries' with random: {self.random} runs the teacher's decoder on random boxes, but the teacher "
                f"({teacher.family}) cannot start from given boxes (decode_queries); set random: 0"
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
        if self.random:
            points = random_boxes(self.random, image_sizes(teacher), boxes.device, boxes.dtype)
            boxes = torch.cat([boxes, points], dim=1)
            extra = torch.full(points.shape[:2], -1, dtype=torch.long, device=index.device)
            valid, index = torch.cat([valid, torch.ones_like(extra, dtype=torch.bool)], dim=1), torch.cat([index, extra], dim=1)
        return boxes, valid, index

    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        """``student``: the side the student's decoder produced on :meth:`teacher_queries`' boxes;
        ``teacher``: the teacher's own side, or (:attr:`teacher_decodes`) its decoder's output on the
        same boxes, whose row k answers student row k."""
        if self.teacher_decodes:
            valid = teacher.require_predictions("decoded points").valid
            image, k = valid.nonzero(as_tuple=True)
            t_index = k
        else:
            _, valid, index = self.teacher_queries(teacher)
            image, k = valid.nonzero(as_tuple=True)
            t_index = index[image, k]
        weight = teacher.predictions.logits[image, t_index].detach().to(compute_dtype()).sigmoid().amax(dim=-1)
        return Pairs(image, k, t_index, weight, valid.shape[0])

    def __str__(self) -> str:
        return f"shared_queries(top_k={self.top_k}" + (f", random={self.random})" if self.random else ")")


def image_sizes(side: DistillInputs) -> Tensor:
    """(B, 2) (height, width) of a side's images: its own, or the canvas its predictions were made on."""
    if side.image_sizes is not None:
        return side.image_sizes
    raise ValueError("shared_queries with random points needs the batch's image sizes")


def random_boxes(count: int, sizes: Tensor, device, dtype) -> Tensor:
    """KD-DETR's general points: (B, count, 4) xyxy px, one draw per step shared by the batch's images,
    sigmoid of N(0, 1) as normalised (cx, cy, w, h), scaled to each image and clipped to it."""
    cxcywh = torch.randn(count, 4, device=device, dtype=dtype).sigmoid()
    half = cxcywh[:, 2:] / 2
    unit = torch.cat([cxcywh[:, :2] - half, cxcywh[:, :2] + half], dim=-1).clamp(0, 1)  # (count, 4) normalised xyxy
    scale = sizes.to(device=device, dtype=dtype).flip(-1).repeat(1, 2)  # (B, 4): w, h, w, h
    return unit[None] * scale[:, None]
