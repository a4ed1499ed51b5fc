"""Feature imitation (``feature``): masked MSE between student and teacher FPN maps.

Pairs index flattened FPN locations (level by level, row-major): they are split per FPN level and
each level's paired feature vectors (C,) become rows (a dense pairer gives the same location on both
sides; for a sparse student, ``gt_boxes`` / ``all`` regions of its FPN grid). A student level is
compared with the teacher level of the same stride, so the teacher may have more levels (a P3-P5
student imitating a P3-P7 GFL teacher). When the channel counts differ, a 1x1 conv adapter
(C_s -> C_t) owned by this loss maps the student rows; it is trained with the student (the engine adds
``loss.parameters()`` to the optimizer) and is not part of the student. With equal channels the
adapter is the identity. A 1x1 conv equals a linear map per location, so it is applied to the
gathered rows only.

Normalisation: ``sum_rows m * ||s - t||^2 / (C_t * sum_rows m)`` — the mean squared error per masked
location and channel over all chosen levels; batch-size independent. ``legacy=True`` reproduces the
official LD ``IMLoss``: an element-wise mean per level, summed over levels, and 0 on a level where
the student has no positive location (the reference overwrites such a level's loss with 0, whatever
its region selects).

``relative=True`` (default) divides instead by the teacher's own energy on the same rows,
``sum m * ||t||^2``: a scale-free relative squared error. FPN activations of different backbones
differ in scale by orders of magnitude (an ImageNet EfficientNet teacher's P3 has an RMS near 40),
so a plain MSE either swamps the detection losses or vanishes; the relative form keeps one weight
meaningful across pairs. ``relative=False`` gives the plain MSE of the LD paper.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.inputs import level_offsets
from distill.losses.kl import weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, register_loss
from distill.ops.precision import compute_dtype
from distill.structures import DetectorSpec, Pairs

_TINY = torch.finfo(torch.float32).tiny


def mimic_rows(student_rows: Tensor, teacher_rows: Tensor, weights: Tensor, normalizer: Tensor | float) -> Tensor:
    """(R, C), (R, C), (R,) -> () ``sum_r w_r * ||s_r - t_r||^2 / normalizer`` in fp32."""
    sq_error = (student_rows.to(compute_dtype()) - teacher_rows.detach().to(compute_dtype())).pow(2).sum(dim=-1)  # (R,)
    return weighted_sum(sq_error, weights, normalizer)


def teacher_levels(student: DistillInputs, teacher: DistillInputs, count: int) -> list[int]:
    """The teacher's FPN level of each of the student's ``count`` levels: the one with the same stride.

    Without specs (strides unknown) levels pair in order. The pair check has already refused a
    student stride the teacher lacks; this raises ConfigError for inputs built around it.
    """
    if student.spec is None or teacher.spec is None:
        return list(range(count))
    t_strides = list(teacher.spec.strides)
    s_strides = list(student.spec.strides[:count])
    missing = [s for s in s_strides if s not in t_strides]
    if missing:
        raise ConfigError(f"loss 'feature': the teacher has no FPN map at student stride(s) {missing} (teacher strides {tuple(t_strides)})")
    return [t_strides.index(s) for s in s_strides]


@register_loss
class FeatureMimic(DistillLoss):
    """Masked FPN feature MSE with an optional 1x1 conv channel adapter."""

    name = "feature"
    needs = frozenset({"features"})

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "main",
        pairer_params: Mapping[str, Any] | None = None,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        level_indices: Sequence[int] | None = None,
        relative: bool = True,
        legacy: bool = False,
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params)
        for key, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ConfigError(f"loss 'feature': {key} must be a positive integer, got {value!r}")
        if level_indices is not None and not (
            len(level_indices) > 0 and all(isinstance(i, int) and i >= 0 for i in level_indices)
        ):
            raise ConfigError(
                f"loss 'feature': level_indices must be a non-empty list of levels >= 0, got {level_indices!r}"
            )
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.level_indices = None if level_indices is None else sorted(set(level_indices))
        self.legacy = bool(legacy)
        self.relative = bool(relative) and not self.legacy
        needs_adapter = None not in (student_channels, teacher_channels) and student_channels != teacher_channels
        self.adapter: nn.Module = nn.Conv2d(student_channels, teacher_channels, 1) if needs_adapter else nn.Identity()

    def adapt(self, rows: Tensor) -> Tensor:
        """(M, C_s) student rows -> (M, C_t), the 1x1 conv applied per location."""
        if isinstance(self.adapter, nn.Identity):
            return rows
        return F.linear(rows, self.adapter.weight.flatten(1).to(compute_dtype()), self.adapter.bias.to(compute_dtype()))

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        super().check_pair(student, teacher)
        if student.fpn_channels is None or teacher.fpn_channels is None:
            raise ConfigError("loss 'feature': both detectors need one channel count on every FPN level")
        self._check_channels(student.fpn_channels, teacher.fpn_channels)

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        sizes = student.feature_sizes()
        teacher_level = teacher_levels(student, teacher, len(sizes))  # student level -> teacher level of the same stride
        t_sizes = teacher.feature_sizes()
        if [t_sizes[teacher_level[level]] for level in range(len(sizes))] != sizes:
            raise ConfigError(
                f"loss 'feature': student FPN sizes {sizes} != teacher {t_sizes} at the same strides; "
                "feature imitation needs the same strides and input size"
            )
        levels = self._levels(len(sizes))
        if self.legacy:
            levels = [level for level in levels if self._has_positives(student, sizes, level)]
        student, teacher = self.prepare(student, teacher)
        # Pairs index the student's flattened grid; both sides read a level's rows with the index
        # inside that level, so a teacher with extra levels (other offsets) is read correctly.
        offsets = level_offsets(sizes, pairs.student.device)  # (L + 1,)
        level_of = torch.bucketize(pairs.student, offsets[1:], right=True)  # (R,)

        rows_s, rows_t, weights = [], [], []
        for level in levels:
            s_rows, t_rows, w = self._level_rows(student, teacher, pairs, level, teacher_level[level], level_of, offsets)
            self.check_rows(s_rows, t_rows)
            s_rows = self.adapt_rows(s_rows.to(compute_dtype()))  # (M_l, C_t)
            if self.legacy:  # each level is its own element-wise mean: scale its rows by 1 / (C * sum w_l)
                w = w / (w.sum() * t_rows.shape[-1]).clamp(min=_TINY)
            rows_s.append(s_rows)
            rows_t.append(t_rows.to(compute_dtype()))
            weights.append(w)
        if not rows_s:  # legacy, no level with positives: an exact 0 still connected to the student
            return student.require_features()[0].sum() * 0.0
        s_all, t_all, w_all = torch.cat(rows_s), torch.cat(rows_t), torch.cat(weights)
        if self.legacy:
            normalizer = 1.0
        elif self.relative:  # teacher energy on the same rows; detached like the teacher itself
            normalizer = (w_all * t_all.detach().pow(2).sum(dim=-1)).sum().clamp(min=_TINY)
        else:
            normalizer = w_all.sum() * t_all.shape[-1]
        return mimic_rows(s_all, t_all, w_all, normalizer)

    def prepare(self, student: DistillInputs, teacher: DistillInputs) -> tuple[DistillInputs, DistillInputs]:
        """The two sides whose feature rows are compared (here: as they are; see ``pkd``)."""
        return student, teacher

    def check_rows(self, student_rows: Tensor, teacher_rows: Tensor) -> None:
        """The gathered rows have the configured channel counts (a teacher cache serves rows, not maps)."""
        self._check_channels(student_rows.shape[-1], teacher_rows.shape[-1])

    def adapt_rows(self, rows: Tensor) -> Tensor:
        """Student rows -> the teacher's channels (here: the adapter, applied to the gathered rows)."""
        return self.adapt(rows)

    @staticmethod
    def _has_positives(student: DistillInputs, sizes: list[tuple[int, int]], level: int) -> bool:
        """Whether the student has a positive (matched) location on FPN level ``level`` (legacy rule)."""
        if student.matches is None:
            raise ConfigError("loss 'feature' with legacy: true zeroes levels without student positives, so it needs the student's matches")
        offsets = level_offsets(sizes, torch.device("cpu")).tolist()
        return any(bool(((index >= offsets[level]) & (index < offsets[level + 1])).any()) for index in student.matches.pred_index)

    @staticmethod
    def _level_rows(student: DistillInputs, teacher: DistillInputs, pairs: Pairs, level: int, t_level: int, level_of: Tensor, offsets: Tensor):
        """Student rows (M, C_s), teacher rows (M, C_t) and weights (M,) of the pairs on student
        level ``level`` (teacher level ``t_level``, the same stride)."""
        start, stop = int(offsets[level]), int(offsets[level + 1])
        if pairs.mask is not None and bool((pairs.mask[:, start:stop] > 0).all()):
            # A region selecting the whole level (``all`` on a full canvas): same rows, no gather/scatter.
            w = pairs.mask[:, start:stop].reshape(-1).to(compute_dtype())
            return student.feature_rows(level, None, None), teacher.feature_rows(t_level, None, None), w
        on_level = level_of == level
        image = pairs.image[on_level]
        s_rows = student.feature_rows(level, image, pairs.student[on_level] - start)
        t_rows = teacher.feature_rows(t_level, image, pairs.teacher[on_level] - start)
        return s_rows, t_rows, pairs.weight[on_level]

    def _levels(self, num_levels: int) -> list[int]:
        if self.level_indices is None:
            return list(range(num_levels))
        bad = [i for i in self.level_indices if i >= num_levels]
        if bad:
            raise ConfigError(f"loss 'feature': level_indices {bad} out of range for {num_levels} FPN levels")
        return self.level_indices

    def _check_channels(self, student_channels: int, teacher_channels: int) -> None:
        expected = (self.student_channels or student_channels, self.teacher_channels or teacher_channels)
        if (student_channels, teacher_channels) != expected:
            raise ConfigError(
                f"loss 'feature': configured for {expected[0]} student / {expected[1]} teacher channels, but the FPN "
                f"maps have {student_channels} / {teacher_channels}"
            )
        if student_channels != teacher_channels and isinstance(self.adapter, nn.Identity):
            raise ConfigError(
                f"loss 'feature': student FPN has {student_channels} channels, teacher {teacher_channels}; set "
                f"student_channels: {student_channels} and teacher_channels: {teacher_channels} "
                "to add a 1x1 conv adapter"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, level_indices={self.level_indices}, relative={self.relative}, legacy={self.legacy}"
