"""Matched pairers: student and teacher predictions joined without a shared index.

- ``gt_bridged``: through the ground truth. Every student prediction matched to GT ``g`` (by the
  student's own loss) is paired with the teacher's match of the same GT (its own matcher: Hungarian
  for a sparse teacher; for a dense teacher, among its ATSS positives of ``g`` the one whose box has
  the best IoU with ``g``). Positives only; weight 1.
- ``teacher_set``: by Hungarian matching (scipy) of the student's valid predictions to the
  teacher's prediction set — a sparse teacher's valid queries, a dense teacher's ``top_k`` after
  class-agnostic NMS — with cost ``class_cost * BCE(sigmoid(s), p_t) + l1_cost * L1 + giou_cost *
  (-GIoU)`` (L1 on boxes divided by the image width / height). Each pair is weighted by the
  teacher's confidence ``max_c p_t``; it carries background knowledge a GT bridge cannot.

Both serve any family pair (dense or sparse on either side) and refuse the feature space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou, nms

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.ops.precision import compute_dtype
from distill.pairers.base import Pairer
from distill.structures import DenseOutputs, Pairs, Predictions, Target


def _pairs(rows: list[tuple[int, Tensor, Tensor, Tensor]], num_images: int, device) -> Pairs:
    """Per-image (b, student (R_b,), teacher (R_b,), weight (R_b,)) -> Pairs sorted by (image, student)."""
    rows = [r for r in rows if len(r[1])]
    if not rows:
        return Pairs.empty(num_images, device)
    image = torch.cat([torch.full_like(s, b) for b, s, _, _ in rows])
    student = torch.cat([s for _, s, _, _ in rows])
    teacher = torch.cat([t for _, _, t, _ in rows])
    weight = torch.cat([w for _, _, _, w in rows]).to(compute_dtype())
    order = torch.argsort(image * (int(student.max()) + 1) + student, stable=True)
    return Pairs(image[order], student[order], teacher[order], weight[order], num_images)


def representative_matches(boxes: Tensor, pred_index: Tensor, gt_index: Tensor, gt_boxes: Tensor) -> Tensor:
    """Per GT the matched prediction whose box has the best IoU with it (lowest index on ties).

    boxes: (P, 4) one image's predicted boxes; pred_index, gt_index: (M,) its matches;
    gt_boxes: (G, 4). Returns (G,) int64 prediction index, -1 for a GT nothing was matched to.
    """
    num_gt = gt_boxes.shape[0]
    rep = torch.full((num_gt,), -1, dtype=torch.long, device=gt_boxes.device)
    if len(pred_index) == 0 or num_gt == 0:
        return rep
    iou = box_iou(boxes[pred_index].to(compute_dtype()), gt_boxes.to(compute_dtype()))[torch.arange(len(pred_index)), gt_index]  # (M,)
    best = torch.full((num_gt,), -1.0, device=iou.device).scatter_reduce(0, gt_index, iou, "amax")
    is_best = iou == best[gt_index]
    sentinel = torch.full((num_gt,), torch.iinfo(torch.long).max, dtype=torch.long, device=iou.device)
    chosen = sentinel.scatter_reduce(0, gt_index[is_best], pred_index[is_best], "amin")
    return torch.where(chosen == sentinel, rep, chosen)


@dataclass(frozen=True)
class GTBridgedPairer(Pairer):
    name = "gt_bridged"
    spaces = ("predictions",)
    teacher_needs = frozenset({"head", "matches"})

    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        s_matches, t_matches = student.matches, teacher.matches
        if s_matches is None or t_matches is None:
            raise ValueError("pairer 'gt_bridged' needs the student's and the teacher's matches")
        t_boxes = teacher.require_predictions("boxes").boxes
        rows = []
        for b, target in enumerate(targets):
            rep = representative_matches(t_boxes[b], t_matches.pred_index[b], t_matches.gt_index[b], target.boxes.to(t_boxes.device))
            s_pred, s_gt = s_matches.pred_index[b], s_matches.gt_index[b]
            t_of = rep[s_gt] if len(s_gt) else s_gt
            keep = t_of >= 0
            rows.append((b, s_pred[keep], t_of[keep], torch.ones(int(keep.sum()), device=t_boxes.device)))
        return _pairs(rows, len(targets), t_boxes.device)


def teacher_candidates(predictions: Predictions, b: int, top_k: int, nms_iou: float) -> Tensor:
    """Indices of image ``b``'s teacher predictions a student is matched to.

    Sparse: every valid query. Dense: the ``top_k`` highest-scoring valid locations after
    class-agnostic NMS at ``nms_iou`` (a grid predicts each object many times).
    """
    valid = predictions.valid[b].nonzero(as_tuple=True)[0]
    if not isinstance(predictions, DenseOutputs):
        return valid
    scores = predictions.logits[b, valid].to(compute_dtype()).sigmoid().amax(dim=-1)
    keep = nms(predictions.boxes[b, valid].to(compute_dtype()), scores, nms_iou)[:top_k]  # sorted by score
    return valid[keep]


def set_matching_cost(
    student_logits: Tensor, student_boxes: Tensor, teacher_probs: Tensor, teacher_boxes: Tensor, size_hw: Tensor,
    class_cost: float = 1.0, l1_cost: float = 5.0, giou_cost: float = 2.0,
) -> Tensor:
    """(S, C) logits, (S, 4) boxes, (T, C) probabilities, (T, 4) boxes -> (S, T) matching cost.

    class: mean over classes of BCE(sigmoid(s), p_t); L1 of boxes divided by (w, h, w, h) of the
    image (``size_hw`` (2,) height, width); GIoU as -GIoU.
    """
    log_p, log_not_p = F.logsigmoid(student_logits.to(compute_dtype())), F.logsigmoid(-student_logits.to(compute_dtype()))  # (S, C)
    p_t = teacher_probs.to(compute_dtype())
    bce = -(log_p @ p_t.T + log_not_p @ (1 - p_t).T) / p_t.shape[1]  # (S, T)
    scale = torch.stack([size_hw[1], size_hw[0], size_hw[1], size_hw[0]]).to(compute_dtype()).to(student_boxes.device)
    l1 = torch.cdist(student_boxes.to(compute_dtype()) / scale, teacher_boxes.to(compute_dtype()) / scale, p=1)
    giou = generalized_box_iou(student_boxes.to(compute_dtype()), teacher_boxes.to(compute_dtype()))
    return class_cost * bce + l1_cost * l1 - giou_cost * giou


@dataclass(frozen=True)
class TeacherSetPairer(Pairer):
    top_k: int = 100
    nms_iou: float = 0.7
    class_cost: float = 1.0
    l1_cost: float = 5.0
    giou_cost: float = 2.0

    name = "teacher_set"
    spaces = ("predictions",)
    teacher_needs = frozenset({"head"})

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ConfigError(f"pairer 'teacher_set': top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.nms_iou, (int, float)) and 0 < self.nms_iou <= 1):
            raise ConfigError(f"pairer 'teacher_set': nms_iou must be in (0, 1], got {self.nms_iou!r}")
        for key in ("class_cost", "l1_cost", "giou_cost"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"pairer 'teacher_set': {key} must be a finite number >= 0, got {value!r}")

    @torch.no_grad()
    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        s_pred, t_pred = student.require_predictions("predictions"), teacher.require_predictions("predictions")
        if student.image_sizes is None:
            raise ValueError("pairer 'teacher_set' needs the image sizes (box costs are relative to the image)")
        rows = []
        for b in range(s_pred.num_images):
            s_idx = s_pred.valid[b].nonzero(as_tuple=True)[0]
            t_idx = teacher_candidates(t_pred, b, self.top_k, self.nms_iou)
            if len(s_idx) == 0 or len(t_idx) == 0:
                continue
            t_probs = t_pred.logits[b, t_idx].to(compute_dtype()).sigmoid()
            cost = set_matching_cost(
                s_pred.logits[b, s_idx], s_pred.boxes[b, s_idx], t_probs, t_pred.boxes[b, t_idx], student.image_sizes[b],
                self.class_cost, self.l1_cost, self.giou_cost,
            )
            # diverged student boxes give NaN costs, on which scipy raises: a huge finite cost keeps
            # the pairing defined, and the NaN loss of those predictions reaches the trainer's guard
            r, c = linear_sum_assignment(torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy())
            r, c = torch.as_tensor(r, device=s_idx.device), torch.as_tensor(c, device=s_idx.device)
            rows.append((b, s_idx[r], t_idx[c], t_probs[c].amax(dim=-1)))
        return _pairs(rows, s_pred.num_images, s_pred.logits.device)

    def __str__(self) -> str:
        return f"teacher_set(top_k={self.top_k})"
