"""PKD (``pkd``): feature imitation on Pearson-normalised FPN maps (Cao et al., NeurIPS 2022).

Both maps are normalised per image and channel over the level's valid (unpadded) locations,
``(x - mean) / sqrt(var + eps^2)``, then compared with a masked MSE halved::

    loss = sum_rows m * ||n(s) - n(t)||^2 / (2 * C_t * sum_rows m)

On the whole map (the ``all`` region) this is ``1 - r``, r the Pearson correlation of the two maps
per channel, averaged: the student matches the teacher's *pattern* whatever the two networks'
activation scales, which is why it needs no scale-fixing normaliser (compare ``feature``'s
``relative``). Other regions read the normalised rows at their locations only.

Differences from mmrazor's ``PKDLoss`` (on purpose): statistics per image rather than over the
whole batch (so the loss does not depend on the batch size or on how torchrun splits it), over the
valid locations only (padding added for other images of the batch does not move them), and the
population variance, and eps inside the root (a constant channel, e.g. a one-location level, has
variance 0: its rows become 0 with a finite gradient, where ``std + eps`` has an infinite one
at 0). With channel counts that differ,
the 1x1 adapter maps the whole student map before it is normalised.

A teacher cache serves it when it holds the teacher's feature rows at every valid location (region
``all``: what ``detkd cache --recipe pkd`` or ``ld-full-feat`` builds, or ``--dense``): the cache
rebuilds the maps from them (``whole_maps``), padding at 0 as the statistics ignore it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.losses.feature import FeatureMimic
from distill.losses.registry import DistillInputs, register_loss
from distill.ops.precision import compute_dtype
from distill.structures import Pairs


def pearson_normalise(feature: Tensor, valid: Tensor, eps: float) -> Tensor:
    """feature (B, C, H, W), valid (B, H, W) bool -> (B, C, H, W) standardised per image and channel
    over the valid locations, ``(x - mean) / sqrt(var + eps^2)`` (population variance), 0 at invalid ones."""
    w = valid[:, None].to(feature.dtype)  # (B, 1, H, W)
    count = w.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    mean = (feature * w).sum(dim=(2, 3), keepdim=True) / count
    centred = (feature - mean) * w
    var = centred.pow(2).sum(dim=(2, 3), keepdim=True) / count
    return centred / (var + eps * eps).sqrt()


@register_loss
class PearsonFeatureMimic(FeatureMimic):
    """Feature imitation on per-image, per-channel standardised FPN maps (``1 - r`` on whole maps)."""

    name = "pkd"
    whole_maps = frozenset({"features"})  # the statistics span every valid location: a cache serves it from region `all`

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "all",
        pairer_params: Mapping[str, Any] | None = None,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        level_indices: Sequence[int] | None = None,
        eps: float = 1e-6,
    ):
        super().__init__(
            weight=weight, pairer=pairer, pairer_params=pairer_params, student_channels=student_channels,
            teacher_channels=teacher_channels, level_indices=level_indices, relative=False, legacy=False,
        )
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ConfigError(f"loss 'pkd': eps must be a positive number, got {eps!r}")
        self.eps = float(eps)

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        return 0.5 * super().loss(student, teacher, pairs)

    def prepare(self, student: DistillInputs, teacher: DistillInputs) -> tuple[DistillInputs, DistillInputs]:
        """Adapter on the whole student maps, then both sides standardised level by level, in the
        compute dtype with autocast off (statistics of bf16 / fp16 maps would lose the pattern)."""
        for s_map, t_map in zip(student.require_features(), teacher.require_features()):  # channels before the adapter
            self._check_channels(s_map.shape[1], t_map.shape[1])
        device = student.require_features()[0].device.type
        with torch.autocast(device_type=device, enabled=False):
            adapted = [self._adapt_map(f.to(compute_dtype())) for f in student.require_features()]
            target = [f.detach().to(compute_dtype()) for f in teacher.require_features()]
            return self._normalised(student, adapted), self._normalised(teacher, target)

    def check_rows(self, student_rows: Tensor, teacher_rows: Tensor) -> None:
        pass  # checked on the maps in prepare; the rows are already in the teacher's channels

    def adapt_rows(self, rows: Tensor) -> Tensor:
        return rows  # already in the teacher's channels (prepare)

    def _adapt_map(self, feature: Tensor) -> Tensor:
        """(B, C_s, H, W) -> (B, C_t, H, W) through the 1x1 adapter (identity with equal channels)."""
        b, c, h, w = feature.shape
        rows = self.adapt(feature.permute(0, 2, 3, 1).reshape(-1, c))
        return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def _normalised(self, side: DistillInputs, features: list[Tensor]) -> DistillInputs:
        """A side holding the standardised maps and nothing else to read rows from: whatever gave the
        raw maps (a model, or a teacher cache rebuilding them from its rows), the rows read next are these."""
        _, _, valid = side.grid("features")  # (B, N) over the levels, flattened level by level
        out, start = [], 0
        for feature in features:
            b, _, h, w = feature.shape
            level_valid = valid[:, start : start + h * w].reshape(b, h, w)
            out.append(pearson_normalise(feature, level_valid, self.eps))
            start += h * w
        return DistillInputs(spec=side.spec, features=out, image_sizes=side.image_sizes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
