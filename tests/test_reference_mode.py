"""``reference: ld``: one switch for what the official LD code does differently (issue 20).

mmdetection's location grid (cell corners, valid flags of the 32-padded image) with hand-written
literals; the recipe expansion (legacy normalisers, the reference's VLR metric, the student's grid) and
its refusals; dense pairs refusing two grids; a teacher and a student trained and distilled on the
reference grid through the CLI. The legacy normalisers and the legacy VLR metric have their own
hand-computed tests (tests/test_loss_golden.py, tests/test_feature_losses.py, tests/test_regions.py).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from cli_helpers import SMALL, invoke, make_scenes, one_error_line
from tolerances import FP32_FEW_OPS

from distill import create_loss
from distill.config import recipe_from_dict
from distill.errors import ConfigError
from distill.ops.grid import dense_points, valid_locations
from distill.structures import DetectorSpec
from recipes import load_recipe
from students import create_student

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ the grid
def test_mmdet_points_are_cell_corners_and_centre_points_cell_centres():
    points, strides = dense_points(((2, 2), (1, 1)), (8, 16), CPU, "mmdet")
    assert points.tolist() == [[0, 0], [8, 0], [0, 8], [8, 8], [0, 0]]
    assert strides.tolist() == [8, 8, 8, 8, 16]
    centre, _ = dense_points(((2, 2), (1, 1)), (8, 16), CPU)
    assert centre.tolist() == [[4, 4], [12, 4], [4, 12], [12, 12], [8, 8]]


def test_valid_cells_of_a_40_by_70_image_on_a_4_by_7_stride_16_level():
    # centre: (j + 0.5) 16 < 70 -> j <= 3; (i + 0.5) 16 < 40 -> i <= 1.
    # mmdet: the image padded to 64 x 96; j 16 < 96 -> j <= 5; i 16 < 64 -> every row.
    sizes = torch.tensor([[40, 70]])
    centre = valid_locations(dense_points(((4, 7),), (16,), CPU)[0], sizes).reshape(4, 7)
    mmdet = valid_locations(dense_points(((4, 7),), (16,), CPU, "mmdet")[0], sizes, grid="mmdet").reshape(4, 7)
    assert centre.int().tolist() == [[1, 1, 1, 1, 0, 0, 0]] * 2 + [[0] * 7] * 2
    assert mmdet.int().tolist() == [[1, 1, 1, 1, 1, 1, 0]] * 4
    # An image already a multiple of 32 covers the same cells under both rules at stride 16.
    full = torch.tensor([[64, 96]])
    assert valid_locations(dense_points(((4, 7),), (16,), CPU)[0], full).sum() == 24
    assert valid_locations(dense_points(((4, 7),), (16,), CPU, "mmdet")[0], full, grid="mmdet").sum() == 24


def test_a_gfl_on_the_mmdet_grid_measures_the_same_distributions_from_corners():
    torch.manual_seed(0)
    centre = create_student("gfl", backbone="resnet10t", num_classes=3, fpn_channels=16, head_convs=1).eval()
    corner = create_student("gfl", backbone="resnet10t", num_classes=3, fpn_channels=16, head_convs=1, grid="mmdet").eval()
    corner.load_state_dict(centre.state_dict())  # the grid is a convention, not a weight
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = centre(images), corner(images)
    assert torch.equal(a.bins.logits, b.bins.logits) and torch.equal(a.logits, b.logits)
    # Every box moves by half a stride (the point moves, the edge distances do not); few fp32 ops on
    # values <= ~300 px: the fp32 bound of a few operations scaled by the magnitude.
    half = (a.strides / 2)[None, :, None]
    torch.testing.assert_close(b.boxes, a.boxes - half, rtol=0, atol=FP32_FEW_OPS * 512)
    assert corner.spec.grid == "mmdet" and centre.spec.grid == "centre"
    assert corner.matching_config["grid"] == "mmdet" and "grid" not in centre.matching_config


def test_grid_parameter_is_validated_with_the_key():
    with pytest.raises(ConfigError, match=r"'student.params.grid' must be one of 'centre', 'mmdet', got str 'corner'"):
        load_recipe("gfl-tiny", ["student.params.grid=corner"])


def test_dense_pairs_refuse_two_grids_for_predictions_but_not_for_features():
    student = DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17, grid="mmdet")
    teacher = DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17)
    with pytest.raises(ConfigError, match=r"the teacher predicts on the 'centre' grid, the student on the 'mmdet' grid"):
        create_loss("ld", pairer="main").check_pair(student, teacher)
    create_loss("feature", pairer="all").check_pair(student, teacher)  # the same cells, whatever their point


# ---------------------------------------------------------------------------------- the switch
def test_reference_ld_sets_legacy_normalisers_the_vlr_metric_and_the_grid():
    recipe = load_recipe("ld-tiny", ["reference=ld"])
    assert recipe.student.params["grid"] == "mmdet"
    assert [spec.params.get("legacy") for spec in recipe.losses] == [True, True, True, True]  # ld, ld, kd, feature
    assert [spec.pairer_params.get("metric") for spec in recipe.losses] == [None, "diou_iof_legacy", None, None]
    again = recipe_from_dict(recipe.to_dict(), "saved")  # a run's saved recipe: already expanded, loads the same
    assert again == recipe
    plain = load_recipe("ld-tiny")
    assert "grid" not in plain.student.params and all("legacy" not in spec.params for spec in plain.losses)


def test_reference_ld_leaves_losses_it_has_no_counterpart_for():
    recipe = load_recipe("crosskd-pkd", ["reference=ld"])
    assert recipe.student.params["grid"] == "mmdet"
    assert all("legacy" not in spec.params for spec in recipe.losses)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["losses.0.params.legacy=false"], "losses[0].params.legacy"),
        (["losses.1.pairer_params.metric=diou"], "losses[1].pairer_params.metric"),
        (["student.params.grid=centre"], "student.params.grid"),
    ],
)
def test_reference_ld_refuses_a_recipe_that_says_otherwise(overrides, key):
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' is .*, but 'reference: ld' sets it to"):
        load_recipe("ld-tiny", ["reference=ld", *overrides])


def test_reference_ld_refuses_a_student_without_a_grid():
    with pytest.raises(ConfigError, match=r"'reference: ld' reproduces a dense GFL pair's reference code, but student 'asag_s'"):
        load_recipe("asag-kd-tiny", ["reference=ld"])


def test_reference_ld_through_the_cli(tmp_path):
    data = make_scenes(tmp_path / "data")
    teacher = tmp_path / "teacher"
    result = invoke("train", "gfl-tiny", "--data", data, "--out", teacher, "--epochs", 1, *SMALL, "--set", "reference=ld")
    assert result.exit_code == 0, result.output
    args = ["distill", "ld-tiny", "--teacher", teacher, "--data", data, "--epochs", 1, "--force", *SMALL]
    result = invoke(*args, "--out", tmp_path / "reference", "--set", "reference=ld")
    assert result.exit_code == 0, result.output
    saved = load_recipe(tmp_path / "reference" / "recipe.yaml")  # the run's recipe, expanded, reloads the same
    assert saved.reference == "ld" and saved == load_recipe("ld-tiny", ["reference=ld", "data.image_size=64", "train.batch_size=4", "train.epochs=1"])
    assert json.loads((tmp_path / "reference" / "run.json").read_text())["student"]["params"]["grid"] == "mmdet"
    # The same teacher with detkd's own grid on the student: one line naming the two grids.
    line = one_error_line(invoke(*args, "--out", tmp_path / "mixed"))
    assert "'mmdet' grid" in line and "'centre' grid" in line
    assert not (tmp_path / "mixed" / "checkpoints").exists()
