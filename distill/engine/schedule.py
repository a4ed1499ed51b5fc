"""Learning-rate schedule as a pure function of the step: nothing to save, resume is exact."""
from __future__ import annotations

import math

from distill.config import TrainSpec


def lr_factor(step: int, steps_per_epoch: int, spec: TrainSpec) -> float:
    """Multiplier of ``spec.lr`` at optimizer step ``step`` (0-based).

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps``, then
    ``cosine`` (down to ``min_lr_ratio`` at the last step), ``step`` (times ``gamma`` at each
    epoch in ``milestones``) or ``constant``.
    """
    total = max(1, spec.epochs * steps_per_epoch)
    if spec.schedule == "cosine":
        progress = min(1.0, step / max(1, total - 1))
        factor = spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif spec.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        factor = spec.gamma ** sum(epoch >= m for m in spec.milestones)
    else:
        factor = 1.0
    if step < spec.warmup_steps:
        alpha = step / spec.warmup_steps
        factor *= spec.warmup_ratio + (1 - spec.warmup_ratio) * alpha
    return factor
