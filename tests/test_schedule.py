"""Learning-rate schedule: hand-computed values at chosen steps.

Python floats (fp64) on both sides, a few operations: pytest.approx's default rel 1e-6 is ~1e9x their rounding.
"""
import math

import pytest

from distill.config import TrainSpec
from distill.engine.schedule import lr_factor


def test_warmup_is_linear_from_ratio():
    spec = TrainSpec(epochs=1, warmup_steps=10, warmup_ratio=0.1, schedule="constant")
    assert lr_factor(0, 100, spec) == pytest.approx(0.1)
    assert lr_factor(5, 100, spec) == pytest.approx(0.1 + 0.9 * 0.5)  # 0.55
    assert lr_factor(10, 100, spec) == 1.0


def test_cosine_reaches_floor_at_last_step():
    spec = TrainSpec(epochs=2, warmup_steps=0, schedule="cosine", min_lr_ratio=0.01)
    total = 2 * 50
    assert lr_factor(0, 50, spec) == pytest.approx(1.0)
    mid = (total - 1) / 2
    assert lr_factor(int(mid), 50, spec) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * int(mid) / 99)))
    assert lr_factor(total - 1, 50, spec) == pytest.approx(0.01)


def test_step_schedule_drops_at_milestone_epochs():
    spec = TrainSpec(epochs=12, warmup_steps=0, schedule="step", milestones=[8, 11], gamma=0.1)
    assert lr_factor(7 * 10 + 9, 10, spec) == 1.0  # last step of epoch index 7
    assert lr_factor(8 * 10, 10, spec) == pytest.approx(0.1)
    assert lr_factor(11 * 10, 10, spec) == pytest.approx(0.01)
