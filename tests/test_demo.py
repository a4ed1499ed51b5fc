"""The demo's pieces: the baseline recipe derived from a distill recipe, and the gap closed."""
import pytest

from distill.engine.demo import baseline_recipe, gap_closed
from recipes import load_recipe


def test_baseline_recipe_is_the_same_student_and_schedule_without_teacher_or_losses():
    recipe = load_recipe("pkd-demo")
    baseline = baseline_recipe(recipe)
    assert baseline.kind == "student" and baseline.teacher is None and baseline.losses == []
    assert baseline.student == recipe.student and baseline.train == recipe.train and baseline.data == recipe.data
    assert baseline.name == "pkd-demo-baseline"
    assert recipe.kind == "distill" and len(recipe.losses) == 1  # the distill recipe itself is untouched


@pytest.mark.parametrize("teacher, baseline, distilled, expected", [
    (0.5, 0.3, 0.4, 0.5),     # half of a 0.2 gap
    (0.5, 0.3, 0.3, 0.0),
    (0.5, 0.3, 0.25, -0.25),  # distillation hurt
    (0.5, 0.3, 0.6, 1.5),     # the student beat its teacher
])
def test_gap_closed(teacher, baseline, distilled, expected):
    assert gap_closed(teacher, baseline, distilled) == pytest.approx(expected)  # fp64, 2 ops: default rel 1e-6 ≫ 1e-16


@pytest.mark.parametrize("teacher", [0.3, 0.2])
def test_gap_closed_is_undefined_when_the_teacher_is_not_better(teacher):
    assert gap_closed(teacher, 0.3, 0.35) is None
