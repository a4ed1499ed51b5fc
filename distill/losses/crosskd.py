"""CrossKD (``crosskd``): distil through the teacher's own head (Wang et al., CVPR 2024).

The student's intermediate head maps at tower stage k (after its first k blocks) continue through
the *frozen teacher's* remaining blocks and output convs; those crossed predictions are distilled to
the teacher's own predictions. The student is never asked to produce the teacher's outputs with its
own, smaller head, only features the teacher's head turns into them, which avoids the conflict
between the ground-truth and the distillation targets on the student's own predictions.

- ``part="cls"``: the class tower is crossed; quality-focal KD (CrossKD's ``KDQualityFocalLoss``):
  per location, ``sum_c BCE(x_c, q_c) * |sigmoid(x_c) - q_c|^beta`` with q = sigmoid(teacher
  logits) as soft target, x the crossed logits; normalised by the student's number of positive
  locations (QFL's normaliser, all-reduced under DDP). CrossKD runs it on every location
  (``pairer: all``).
- ``part="box"``: the regression tower is crossed; LD's temperature KL on the per-edge bins of the
  crossed and the teacher's distributions (the same bins: both come out of the teacher's head),
  mean over the 4 edges, normalised by the pair weights (``pairer: main``, CrossKD's positives).
  Our KL kernel averages over the K bins (as LD); the reference sums them (``class_reduction=
  'sum'``), so its weight 3 corresponds to 3·K here (51 for 17 bins).
- ``part="giou"``: the regression tower is crossed and its bins decoded into boxes on the
  student's grid; GIoU loss against the teacher's boxes, normalised by the pair weights (CrossKD's
  ``loss_bbox_kd``, weight 2 in its GFL config).

Stage: ``stage`` student blocks (default: all of them), then the teacher's blocks from
``min(stage, S_t)`` on. When the towers' widths differ, a 1x1 conv adapter (student_channels ->
teacher_channels) maps the student's stage maps first; it is trained with the student. Gradients
reach the student's head (blocks before the stage), the FPN and backbone below it, and the adapter;
the teacher's parameters are frozen and its forward is otherwise untouched.

Query detectors cross at their last decoder layer instead: :mod:`distill.losses.crosskd_query`.
A teacher cache cannot serve this loss (the teacher's head runs on the student's maps each step).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from distill.errors import ConfigError
from distill.losses.kl import softmax_kl, weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, check_same_classes, check_widths, register_loss, width_adapter
from distill.ops.precision import compute_dtype
from distill.structures import BoxBins, DetectorSpec, Pairs

PARTS = ("cls", "box", "giou")


def qfl_kd_rows(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """(R, C), (R, C) -> (R,): ``sum_c BCE(s_c, q_c) * |sigmoid(s_c) - q_c|^beta``, q = sigmoid(t_c)."""
    s = student_logits.to(compute_dtype())
    q = torch.sigmoid(teacher_logits.detach().to(compute_dtype()))
    bce = F.binary_cross_entropy_with_logits(s, q, reduction="none")
    return (bce * (torch.sigmoid(s) - q).abs().pow(beta)).sum(dim=-1)


def student_positives(student: DistillInputs, device) -> Tensor:
    """() the number of the student's matched predictions, at least 1: QFL's normaliser, which CrossKD's
    class term shares (all-reduced under DDP by ``weighted_sum``)."""
    positives = sum(len(i) for i in student.matches.pred_index) if student.matches is not None else 0
    return torch.tensor(float(max(positives, 1)), device=device)


@register_loss
class CrossKD(DistillLoss):
    """Head-crossing KD for conv-tower heads (GFL): ``part`` cls (quality-focal KD), box (LD KL on
    the bins) or giou (GIoU of the decoded boxes)."""

    name = "crosskd"
    needs = frozenset({"head", "head_tail"})
    cache_refusal = "runs the teacher's head on the student's own maps at every step, which no cache can hold"

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "main",
        pairer_params: Mapping[str, Any] | None = None,
        part: str = "cls",
        stage: int | None = None,
        beta: float = 1.0,
        temperature: float = 1.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params)
        if part not in PARTS:
            raise ConfigError(f"loss 'crosskd': part must be one of {', '.join(PARTS)}, got {part!r}")
        if stage is not None and not (isinstance(stage, int) and not isinstance(stage, bool) and stage >= 0):
            raise ConfigError(f"loss 'crosskd': stage must be an integer >= 0 (student tower blocks before the crossing), got {stage!r}")
        for key, value in (("beta", beta), ("temperature", temperature)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"loss 'crosskd': {key} must be > 0, got {value!r}")
        self.adapter: nn.Module = width_adapter(self.name, student_channels, teacher_channels, lambda s, t: nn.Conv2d(s, t, 1))
        self.part = part
        self.stage = stage
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.student_channels, self.teacher_channels = student_channels, teacher_channels

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        super().check_pair(student, teacher)
        for side, spec in (("student", student), ("teacher", teacher)):
            if spec.family != "dense" or spec.head_stages is None:
                raise ConfigError(f"loss 'crosskd': the {side} needs a dense head with conv towers that can be crossed (GFL)")
        if self.stage is not None and self.stage > student.head_stages:
            raise ConfigError(f"loss 'crosskd': stage {self.stage} > the student's {student.head_stages} tower blocks")
        if tuple(student.strides) != tuple(teacher.strides[: len(student.strides)]):
            raise ConfigError(f"loss 'crosskd': student strides {student.strides} must be the teacher's first levels {teacher.strides}")
        if self.part == "cls":
            check_same_classes(self.name, student, teacher)
        widths = (student.fpn_channels, teacher.fpn_channels)
        check_widths(self.name, "head width", widths, (self.student_channels, self.teacher_channels), self.adapter, "1x1 conv")

    def crossed(self, student: DistillInputs, teacher: DistillInputs) -> Tensor:
        """The crossed predictions on the student's grid: class logits (B, N, C) or bin logits (B, N, 4, K)."""
        stages = student.require_predictions("head stages").stages
        if stages is None:
            raise ConfigError("loss 'crosskd': the student's predictions carry no head stages (a training forward of a GFL head keeps them)")
        if teacher.head_tail is None:
            raise ConfigError("loss 'crosskd': the teacher side has no head_tail (it must be the online frozen teacher)")
        k = stages.num_blocks if self.stage is None else self.stage
        t_stage = min(k, teacher.spec.head_stages) if teacher.spec is not None else k
        tower = "cls" if self.part == "cls" else "reg"
        maps = [self._adapt(m.to(compute_dtype())) for m in getattr(stages, tower)[k]]
        cls, bins = teacher.head_tail(t_stage, maps if tower == "cls" else None, maps if tower == "reg" else None)
        return cls if tower == "cls" else bins

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        crossed = self.crossed(student, teacher)
        if self.part == "cls":
            rows = qfl_kd_rows(crossed[pairs.image, pairs.student], teacher.cls_rows(pairs.image, pairs.teacher), self.beta)
            return weighted_sum(rows, pairs.weight, student_positives(student, rows.device))
        if self.part == "giou":  # crossed bins decoded on the student's grid, as the teacher decodes its own
            preds = student.require_predictions("the location grid")
            boxes = BoxBins(crossed, preds.points[None], preds.strides.reshape(1, -1, 1)).decode()  # (B, N, 4)
            rows = generalized_box_iou_loss(boxes[pairs.image, pairs.student], teacher.box_rows(pairs.image, pairs.teacher).detach().to(compute_dtype()), reduction="none")
            return weighted_sum(rows, pairs.weight, pairs.weight.sum())
        s_rows = crossed[pairs.image, pairs.student].flatten(0, 1)  # (R * 4, K)
        t_rows = teacher.bin_rows(pairs.image, pairs.teacher).flatten(0, 1)
        row_weights = pairs.weight.repeat_interleave(4)
        return weighted_sum(softmax_kl(s_rows, t_rows, self.temperature), row_weights, row_weights.sum())

    def _adapt(self, x: Tensor) -> Tensor:
        """(B, C_s, H, W) -> (B, C_t, H, W) through the 1x1 adapter (identity with equal widths)."""
        if isinstance(self.adapter, nn.Identity):
            return x
        return F.conv2d(x, self.adapter.weight.to(compute_dtype()), self.adapter.bias.to(compute_dtype()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, part={self.part!r}, stage={self.stage}, beta={self.beta}, temperature={self.temperature}"
