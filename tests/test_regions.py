"""Distillation regions: registry contract for every region, and hand-computed masks on literal points.

Hand-built VLR geometry: stride-1 locations, so anchors are 8 x 8 squares centred on the points; one
GT box [0, 0, 8, 8]. For points (x, 4) the anchor is [x-4, 0, x+4, 8]:

| point | anchor      | inter | IoU          | rho^2 | c^2 (enclosing)      | DIoU     | IoF - rho^2/c^2 (legacy)  |
|-------|-------------|-------|--------------|-------|----------------------|----------|---------------------------|
| (4,4) | [0,0,8,8]   | 64    | 1            | 0     | 8^2+8^2 = 128        | 1        | 1                         |
| (6,4) | [2,0,10,8]  | 48    | 48/80 = 0.6  | 4     | 10^2+8^2 = 164       | 0.575610 | 48/64 - 4/164 = 0.725610  |
| (8,4) | [4,0,12,8]  | 32    | 32/96 = 1/3  | 16    | 12^2+8^2 = 208       | 0.256410 | 32/64 - 16/208 = 0.423077 |
| (10,4)| [6,0,14,8]  | 16    | 16/112 = 1/7 | 36    | 14^2+8^2 = 260       | 0.004396 | 16/64 - 36/260 = 0.111538 |
| (12,4)| [8,0,16,8]  | 0     | 0            | 64    | 16^2+8^2 = 320       | -0.2     | -0.2                      |
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.regions import Region, create_region, list_regions
from distill.structures import Matches, Target

POINTS = torch.tensor([[4.0, 4.0], [6.0, 4.0], [8.0, 4.0], [10.0, 4.0], [12.0, 4.0]])
STRIDES = torch.ones(5)
GT = Target(boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]]), labels=torch.tensor([0]))


@dataclass
class Grid:
    """What a region reads besides the points and the GT: the student's matches and the valid locations."""

    matches: Matches
    valid: Tensor  # (B, N) bool


def assignment(num_locations: int, alphas: list[Tensor], pos: list[int] = (), invalid: list[int] = ()) -> Grid:
    """One image per entry of ``alphas`` (the ATSS thresholds of that image's GTs); every image has the
    positives ``pos`` (matched to GT 0, weight 0.5) and the padding locations ``invalid``."""
    b = len(alphas)
    index = torch.tensor(sorted(pos), dtype=torch.long)
    matches = Matches(
        pred_index=[index.clone() for _ in range(b)],
        gt_index=[torch.zeros(len(index), dtype=torch.long) for _ in range(b)],
        weight=[torch.full((len(index),), 0.5) for _ in range(b)],
        extras={"pos_thresholds": list(alphas)},
    )
    valid = torch.ones(b, num_locations, dtype=torch.bool)
    valid[:, list(invalid)] = False
    return Grid(matches, valid)


def region_mask(name: str, targets, grid: Grid, points=POINTS, strides=STRIDES, **params) -> Tensor:
    return create_region(name, **params)(points, strides, targets, grid.matches, grid.valid)


def vlr(targets, grid: Grid, points=POINTS, strides=STRIDES, **params) -> Tensor:
    return region_mask("vlr", targets, grid, points, strides, **params)


# --- registry contract ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_regions())
def test_region_contract(name):
    """(B, N) float32, 0 on padding, never a crash on an image without GT (second image)."""
    targets = [GT, Target.empty()]
    grid = assignment(5, [torch.tensor([0.8]), torch.zeros(0)], pos=[0], invalid=[4])
    grid.matches.pred_index[1] = grid.matches.pred_index[1][:0]  # no GT -> no positives
    grid.matches.gt_index[1] = grid.matches.gt_index[1][:0]
    grid.matches.weight[1] = grid.matches.weight[1][:0]
    mask = region_mask(name, targets, grid)
    assert mask.shape == (2, 5) and mask.dtype == torch.float32
    assert (mask[:, 4] == 0).all() and (mask >= 0).all()
    if name == "all":
        assert mask[1].tolist() == [1, 1, 1, 1, 0]
    else:
        assert (mask[1] == 0).all()


def test_builtin_regions_are_registered():
    assert set(list_regions()) == {"main", "vlr", "gt_boxes", "all"}


def test_unknown_region_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown distillation region 'inside'"):
        create_region("inside")
    with pytest.raises(ConfigError, match="region 'vlr' has no option 'gama'; accepted: gamma, metric, exclude_pos"):
        create_region("vlr", gama=0.5)
    with pytest.raises(ConfigError, match="region 'main' has no option 'gamma'"):
        create_region("main", gamma=0.5)
    with pytest.raises(ConfigError, match="metric"):
        create_region("vlr", metric="giou")
    with pytest.raises(ConfigError, match="gamma"):
        create_region("vlr", gamma=-0.1)


def test_regions_are_hashable_values():
    assert create_region("vlr", gamma=0.5, metric="diou") == create_region("vlr", metric="diou", gamma=0.5)
    assert create_region("vlr") != create_region("vlr", gamma=0.5)
    assert isinstance(create_region("main"), Region) and str(create_region("main")) == "main"


# --- main, all, gt_boxes ----------------------------------------------------------------------


def test_main_is_the_valid_positives():
    grid = assignment(5, [torch.tensor([0.8])], pos=[1, 2])
    assert region_mask("main", [GT], grid).tolist() == [[0, 1, 1, 0, 0]]
    # a positive on a padding location is not distilled
    assert region_mask("main", [GT], assignment(5, [torch.tensor([0.8])], pos=[1, 2], invalid=[2])).tolist() == [[0, 1, 0, 0, 0]]


def test_gt_boxes_requires_the_centre_strictly_inside():
    # (4,4), (6,4) inside [0,0,8,8]; (8,4) on its right edge -> outside; (10,4) inside the second box
    # [9,3,11,5] (masked out while it is padding); (12,4) outside both
    target = Target(boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [9.0, 3.0, 11.0, 5.0]]), labels=torch.tensor([0, 0]))
    grid = assignment(5, [torch.tensor([0.8, 0.8])], invalid=[3])
    assert region_mask("gt_boxes", [target], grid).tolist() == [[1, 1, 0, 0, 0]]
    grid = assignment(5, [torch.tensor([0.8, 0.8])])
    assert region_mask("gt_boxes", [target], grid).tolist() == [[1, 1, 0, 1, 0]]


# --- vlr --------------------------------------------------------------------------------------
# Masks are IoUs of small dyadic boxes (a few fp32 roundings of values ≤ 1): assert_close's fp32 default
# (atol 1e-5) is > 10x. Band edges are ≥ 0.004 from every DIoU here (exactly 1 where the box is the GT).


def test_vlr_true_diou_band():
    # alpha_pos = 0.8, gamma = 0.25: band [0.2, 0.8) holds the DIoUs 0.5756 (6,4) and 0.2564 (8,4);
    # (4,4) (DIoU 1) is above, (10,4) (0.0044) and (12,4) (-0.2) below. Values are the IoUs 0.6 and 1/3.
    mask = vlr([GT], assignment(5, [torch.tensor([0.8])]))
    torch.testing.assert_close(mask, torch.tensor([[0.0, 0.6, 1 / 3, 0.0, 0.0]]))


def test_vlr_true_and_legacy_metrics_differ_as_computed_by_hand():
    # alpha_pos = 0.7, gamma = 0.125: band [0.0875, 0.7).
    # true DIoU:  (6,4) 0.5756 in, (8,4) 0.2564 in, (10,4) 0.0044 out -> IoUs (0.6, 1/3, 0)
    # legacy IoF: (6,4) 0.7256 out, (8,4) 0.4231 in, (10,4) 0.1115 in -> IoUs (0, 1/3, 1/7)
    grid = assignment(5, [torch.tensor([0.7])])
    true = vlr([GT], grid, gamma=0.125)
    legacy = vlr([GT], grid, gamma=0.125, metric="diou_iof_legacy")
    torch.testing.assert_close(true, torch.tensor([[0.0, 0.6, 1 / 3, 0.0, 0.0]]))
    torch.testing.assert_close(legacy, torch.tensor([[0.0, 0.0, 1 / 3, 1 / 7, 0.0]]))


def test_vlr_overlaps_positives_unless_excluded_and_skips_padding():
    grid = assignment(5, [torch.tensor([0.8])], pos=[1], invalid=[2])
    # (6,4) is a positive but in the band: kept by default (as the reference), dropped with exclude_pos;
    # (8,4) is in the band but padding -> 0.
    torch.testing.assert_close(vlr([GT], grid), torch.tensor([[0.0, 0.6, 0.0, 0.0, 0.0]]))
    assert vlr([GT], grid, exclude_pos=True).tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0]]


def test_vlr_picks_the_gt_with_the_largest_iou():
    # Point (8,4), anchor [4,0,12,8]. GT1 [0,0,8,8]: IoU 1/3, DIoU 0.2564 (table).
    # GT2 [6,0,14,8]: inter [6,0,12,8] = 48, union 80 -> IoU 0.6; rho^2 = (10-8)^2 = 4;
    # enclosing [4,0,14,8]: c^2 = 10^2 + 8^2 = 164 -> DIoU 0.6 - 4/164 = 0.5756.
    point, stride = torch.tensor([[8.0, 4.0]]), torch.ones(1)
    target = Target(boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [6.0, 0.0, 14.0, 8.0]]), labels=torch.tensor([0, 1]))
    # alphas (0.8, 0.8): in both bands [0.2, 0.8) -> the larger IoU, 0.6
    both = vlr([target], assignment(1, [torch.tensor([0.8, 0.8])]), point, stride)
    torch.testing.assert_close(both, torch.tensor([[0.6]]))
    # alpha(GT2) = 0.5: 0.5756 >= 0.5 is above GT2's band -> only GT1 remains, IoU 1/3
    one = vlr([target], assignment(1, [torch.tensor([0.8, 0.5])]), point, stride)
    torch.testing.assert_close(one, torch.tensor([[1 / 3]]))


def test_vlr_band_is_half_open_at_alpha():
    # alpha_pos = 1: the anchor equal to the GT has DIoU exactly 1 = alpha -> outside [0.25, 1)
    mask = vlr([GT], assignment(5, [torch.tensor([1.0])]))
    torch.testing.assert_close(mask, torch.tensor([[0.0, 0.6, 1 / 3, 0.0, 0.0]]))


def test_vlr_gamma_one_is_empty():
    # band [alpha, alpha) is empty whatever the geometry
    assert (vlr([GT], assignment(5, [torch.tensor([0.8])]), gamma=1.0) == 0).all()


def test_vlr_without_atss_thresholds_is_a_config_error():
    with pytest.raises(ConfigError, match="pos_thresholds"):
        vlr([GT], assignment(5, []))


def test_vlr_batch_each_image_sees_only_its_own_gts():
    # GT2 = GT shifted right by 6, so point offsets from its centre are -6, -4, -2, 0, 2 -> by the
    # table's symmetry: IoU 1/7 (DIoU 0.0044, out), 1/3 (in), 0.6 (in), 1 (DIoU 1, out), 0.6 (in).
    gt2 = Target(boxes=torch.tensor([[6.0, 0.0, 14.0, 8.0]]), labels=torch.tensor([1]))
    targets = [GT, Target.empty(), gt2]
    mask = vlr(targets, assignment(5, [torch.tensor([0.8]), torch.zeros(0), torch.tensor([0.8])]))
    torch.testing.assert_close(mask, torch.tensor([
        [0.0, 0.6, 1 / 3, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 1 / 3, 0.6, 0.0, 0.6],
    ]))
    for b, target in enumerate(targets):  # the same as one image at a time
        alone = vlr([target], assignment(5, [assignment(5, [torch.tensor([0.8]), torch.zeros(0), torch.tensor([0.8])]).matches.extras["pos_thresholds"][b]]))
        torch.testing.assert_close(alone[0], mask[b])


def test_vlr_batch_without_any_gt_is_all_zero():
    mask = vlr([Target.empty(), Target.empty()], assignment(5, [torch.zeros(0), torch.zeros(0)]))
    assert mask.shape == (2, 5) and (mask == 0).all()


# --- matches=None -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gt_boxes", "all"])
def test_regions_without_matches_accept_none(name):
    # gt_boxes and all do not read the student's matches, so they also serve a sparse student's FPN grid
    targets = [GT, Target.empty()]
    grid = assignment(5, [torch.tensor([0.8]), torch.zeros(0)], invalid=[4])
    with_matches = region_mask(name, targets, grid)
    without = create_region(name)(POINTS, STRIDES, targets, None, grid.valid)
    assert torch.equal(without, with_matches)


@pytest.mark.parametrize("name", ["main", "vlr"])
def test_regions_reading_matches_refuse_none(name):
    with pytest.raises(ConfigError, match=f"region '{name}' reads the student's dense matches"):
        create_region(name)(POINTS, STRIDES, [GT], None, torch.ones(1, 5, dtype=torch.bool))


def test_vlr_reads_only_the_pos_thresholds_extra():
    # VLR needs the ATSS thresholds, not the positives: the same mask with or without matched rows
    grid = assignment(5, [torch.tensor([0.8])], pos=[0, 1])
    no_rows = Matches([torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], None, grid.matches.extras)
    torch.testing.assert_close(vlr([GT], grid), vlr([GT], Grid(no_rows, grid.valid)))
    # a matcher without the extra (a Hungarian matcher) is refused with a ConfigError naming it
    with pytest.raises(ConfigError, match="pos_thresholds"):
        vlr([GT], Grid(Matches(grid.matches.pred_index, grid.matches.gt_index), grid.valid))
