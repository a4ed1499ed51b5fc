import math

import pytest
import torch
from tolerances import FP32_FEW_OPS
from torchvision.ops import box_iou

from distill.ops.atss import atss_assign
from distill.ops.boxes import square_anchors

# Thresholds mean + std of ≤ 18 IoUs in [0, 1], in fp32: the mean, the centred squares and the sqrt are
# ≤ 16 roundings of values ≤ 1, so FP32_FEW_OPS (≈ 9.5e-6) absolute; IoUs of literal boxes are a few
# roundings (allclose's default rtol 1e-5 is > 10x).

C = 5  # classes; label 5 is background

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # area 100, centre (5, 5)
# Two levels of hand-built anchors around GT (all IoUs are areas over 100 or 100 over areas):
TWO_LEVEL_ANCHORS = torch.tensor(
    [
        # level 0
        [1.0, 0.0, 9.0, 10.0],  # a0: inside GT, area 80 -> IoU 0.8, centre (5, 5), distance 0
        [0.0, 0.0, 2.0, 10.0],  # a1: inside GT, area 20 -> IoU 0.2, centre (1, 5), distance 4
        [20.0, 0.0, 30.0, 10.0],  # a2: disjoint -> IoU 0, centre (25, 5), distance 20
        # level 1
        [0.0, 8.0, 10.0, 10.0],  # b0: inside GT, area 20 -> IoU 0.2, centre (5, 9), distance 4
        [-5.0, -5.0, 15.0, 20.0],  # b1: contains GT, area 500 -> IoU 0.2, centre (5, 7.5), distance 2.5
    ]
)


def test_two_levels_single_gt_threshold_and_positive():
    res = atss_assign(TWO_LEVEL_ANCHORS, [3, 2], GT, torch.tensor([3]), C, topk=2)
    # candidates: level 0 the 2 closest (a0, a1); level 1 both (b0, b1)
    # IoUs 0.8, 0.2, 0.2, 0.2: mean = 1.4 / 4 = 0.35
    # unbiased var = (0.45^2 + 3 * 0.15^2) / 3 = (0.2025 + 0.0675) / 3 = 0.09 -> std 0.3
    # alpha_pos = 0.65: only a0 (0.8, centre inside) is positive
    assert res.pos_thresholds.shape == (1,)
    assert res.pos_thresholds.item() == pytest.approx(0.65, abs=FP32_FEW_OPS)
    assert res.pos_mask.tolist() == [True, False, False, False, False]
    assert res.labels.tolist() == [3, C, C, C, C]
    assert res.matched_gt.tolist() == [0, -1, -1, -1, -1]
    assert torch.allclose(res.ious[:, 0], torch.tensor([0.8, 0.2, 0.0, 0.2, 0.2]))


def test_invalid_anchor_is_never_candidate_nor_positive():
    valid = torch.tensor([False, True, True, True, True])
    res = atss_assign(TWO_LEVEL_ANCHORS, [3, 2], GT, torch.tensor([3]), C, valid=valid, topk=2)
    # a0 is invalid, so level 0's 2 closest valid anchors are a1 (0.2) and a2 (0.0); level 1: 0.2, 0.2
    # mean = 0.6 / 4 = 0.15; var = (3 * 0.05^2 + 0.15^2) / 3 = 0.03 / 3 = 0.01 -> std 0.1
    # alpha_pos = 0.25 > every candidate's IoU -> no positive (a0 would have 0.8 but is invalid)
    assert res.pos_thresholds.item() == pytest.approx(0.25, abs=FP32_FEW_OPS)
    assert not res.pos_mask.any()
    assert res.ious[0].tolist() == [0.0]  # invalid rows are zeroed
    assert (res.labels == C).all() and (res.matched_gt == -1).all()


def test_level_with_fewer_valid_anchors_than_topk():
    # topk 9 > anchors per level: every valid anchor is a candidate. Only b1 is invalid:
    # candidates a0, a1, a2, b0 with IoUs 0.8, 0.2, 0, 0.2: mean = 1.2 / 4 = 0.3
    # var = (0.5^2 + 0.1^2 + 0.3^2 + 0.1^2) / 3 = (0.25 + 0.01 + 0.09 + 0.01) / 3 = 0.12
    # alpha_pos = 0.3 + sqrt(0.12) = 0.646410 -> a0 positive only
    valid = torch.tensor([True, True, True, True, False])
    res = atss_assign(TWO_LEVEL_ANCHORS, [3, 2], GT, torch.tensor([1]), C, valid=valid, topk=9)
    assert res.pos_thresholds.item() == pytest.approx(0.3 + math.sqrt(0.12), abs=FP32_FEW_OPS)
    assert res.pos_mask.tolist() == [True, False, False, False, False]


def test_anchor_claimed_by_two_gts_keeps_highest_iou():
    anchors = TWO_LEVEL_ANCHORS[[0, 1, 3, 4]]  # a0, a1, b0, b1 as one level, all candidates (topk 9)
    gts = torch.tensor([[0.0, 0.0, 10.0, 12.5], [0.0, 0.0, 10.0, 10.0]])  # B (area 125) first, then A
    # GT A (index 1): IoUs 0.8, 0.2, 0.2, 0.2 -> alpha_pos 0.65 (as above) -> a0 positive
    # GT B (index 0): a0, a1, b0 lie inside B -> 80/125 = 0.64, 20/125 = 0.16, 0.16; b1 contains B: 125/500 = 0.25
    #   mean = 1.21 / 4 = 0.3025
    #   var = (0.3375^2 + 2 * 0.1425^2 + 0.0525^2) / 3 = (0.11390625 + 0.0406125 + 0.00275625) / 3 = 0.052425
    #   alpha_pos = 0.3025 + sqrt(0.052425) = 0.3025 + 0.228965 = 0.531465 -> a0 (0.64, centre (5,5) inside) positive
    # a0 is positive for both: IoU 0.8 with A beats 0.64 with B -> matched to A (index 1, label 4)
    res = atss_assign(anchors, [4], gts, torch.tensor([2, 4]), C)
    expected_thr = torch.tensor([0.3025 + math.sqrt(0.052425), 0.65])
    assert torch.allclose(res.pos_thresholds, expected_thr, atol=FP32_FEW_OPS)
    assert res.pos_mask.tolist() == [True, False, False, False]
    assert res.matched_gt.tolist() == [1, -1, -1, -1]
    assert res.labels.tolist() == [4, C, C, C]
    assert torch.allclose(res.ious[0], torch.tensor([0.64, 0.8]))


@pytest.mark.parametrize("left, positive", [(5.0, False), (4.0, True)])
def test_centre_must_be_strictly_inside_gt(left, positive):
    # One level, 4 anchors, all candidates. Candidate IoUs (v, 0, 0, 0):
    #   mean v/4, unbiased var = ((3v/4)^2 + 3 (v/4)^2) / 3 = v^2 / 4 -> alpha_pos = v/4 + v/2 = 3v/4 < v
    # so the first anchor always passes the IoU test and only the centre rule decides.
    #   left 5: box (5,0,15,10), IoU 50/150 = 1/3, centre x = 10 on the GT's right side -> excluded
    #   left 4: box (4,0,14,10), IoU 60/140 = 3/7, centre x = 9, 1 px inside -> positive
    anchors = torch.tensor(
        [[left, 0.0, left + 10, 10.0], [20.0, 0.0, 30.0, 10.0], [30.0, 0.0, 40.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
    )
    v = (10 - left) * 10 / (100 + 100 - (10 - left) * 10)
    res = atss_assign(anchors, [4], GT, torch.tensor([0]), C)
    assert res.pos_thresholds.item() == pytest.approx(0.75 * v, abs=FP32_FEW_OPS)
    assert res.pos_mask.tolist() == [positive, False, False, False]


def test_gt_smaller_than_any_anchor_still_gets_a_positive():
    # A 4x4 GT centred at (12, 12) against 64 px square anchors (stride 8, scale 8) on one row.
    points = torch.tensor([[12.0, 12.0], [52.0, 12.0], [92.0, 12.0], [132.0, 12.0]])
    anchors = square_anchors(points, torch.full((4,), 8.0))  # first: (-20,-20,44,44) contains the GT
    gt = torch.tensor([[10.0, 10.0, 14.0, 14.0]])
    # IoU of the first anchor = 16 / 4096 = 1/256; the others start at x = 20 > 14: IoU 0
    # candidates (v, 0, 0, 0) -> alpha_pos = 3v/4 = 3/1024; centre (12,12) inside the GT -> positive
    res = atss_assign(anchors, [4], gt, torch.tensor([2]), C)
    # dyadic IoU 1/256: only /3 and sqrt round (≤ 3 · 2^-24 ≈ 1.8e-7 relative): 1e-5 is > 50x
    assert res.pos_thresholds.item() == pytest.approx(3 / 1024, rel=1e-5)
    assert res.pos_mask.tolist() == [True, False, False, False]
    assert res.labels.tolist() == [2, C, C, C]


def test_topk_selects_closest_per_level():
    # Level 0: 5 equal anchors along x; GT centre x = 21 -> distances 21, 11, 1, 9, 19 (no ties)
    # topk 2 -> candidates anchors 2 (centre 20) and 3 (centre 30); level 1: one anchor, distance 1
    xs = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0])
    level0 = torch.stack([xs - 5, torch.full_like(xs, -5), xs + 5, torch.full_like(xs, 5)], dim=1)
    level1 = torch.tensor([[0.0, -10.0, 40.0, 10.0]])  # 40 x 20, centre (20, 0)
    anchors = torch.cat([level0, level1])
    gt = torch.tensor([[16.0, -5.0, 26.0, 5.0]])  # 10 x 10, centre (21, 0)
    # IoUs: anchor 2 overlaps 9 x 10 = 90 -> 90 / 110 = 9/11; anchor 3: 1 x 10 -> 10 / 190 = 1/19
    #       level-1 anchor contains GT: 100 / 800 = 1/8
    # mean = (0.818182 + 0.052632 + 0.125) / 3 = 0.331938
    # unbiased var = (0.486244^2 + 0.279306^2 + 0.206938^2) / 2 = 0.357268 / 2 = 0.178634 -> std 0.422651
    # alpha_pos = 0.754589
    ious = [9 / 11, 1 / 19, 1 / 8]
    mean = sum(ious) / 3
    thr = mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 2)
    assert thr == pytest.approx(0.754589, abs=1e-6)  # fp64 vs the comment's 6 digits (≤ 5e-7)
    res = atss_assign(anchors, [5, 1], gt, torch.tensor([0]), C, topk=2)
    assert res.pos_thresholds.item() == pytest.approx(thr, abs=FP32_FEW_OPS)
    # only anchor 2 (9/11 ~ 0.818 >= thr ~ 0.75) is positive; anchors 0, 1, 4 were never candidates
    assert res.pos_mask.tolist() == [False, False, True, False, False, False]


def test_empty_gt():
    anchors = TWO_LEVEL_ANCHORS
    res = atss_assign(anchors, [3, 2], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), C)
    assert res.ious.shape == (5, 0) and res.pos_thresholds.shape == (0,)
    assert not res.pos_mask.any() and (res.labels == C).all() and (res.matched_gt == -1).all()


def test_no_valid_anchor_and_bad_level_sizes():
    res = atss_assign(TWO_LEVEL_ANCHORS, [3, 2], GT, torch.tensor([0]), C, valid=torch.zeros(5, dtype=torch.bool))
    assert not res.pos_mask.any() and torch.isfinite(res.pos_thresholds).all()
    with pytest.raises(ValueError, match="num_per_level"):
        atss_assign(TWO_LEVEL_ANCHORS, [3, 3], GT, torch.tensor([0]), C)


def reference_atss(anchors, num_per_level, gts, labels, num_classes, valid, topk):
    """Straightforward per-GT loop following the ATSS definition, for cross-checking."""
    n = anchors.shape[0]
    ious = box_iou(anchors, gts) * valid[:, None]
    actr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((n,), -1.0)
    out_gt = torch.full((n,), -1, dtype=torch.long)
    thresholds = []
    for g in range(gts.shape[0]):
        gctr = (gts[g, :2] + gts[g, 2:]) / 2
        cand = []
        start = 0
        for count in num_per_level:
            idx = [i for i in range(start, start + count) if valid[i]]
            idx.sort(key=lambda i: (actr[i] - gctr).norm().item())
            cand += idx[:topk]
            start += count
        cand_ious = ious[cand, g]
        thr = cand_ious.mean() + cand_ious.std()
        thresholds.append(thr)
        for i in cand:
            x, y = actr[i]
            inside = min(x - gts[g, 0], y - gts[g, 1], gts[g, 2] - x, gts[g, 3] - y) > 0.01
            if ious[i, g] >= thr and inside and ious[i, g] > best[i]:
                best[i], out_gt[i] = ious[i, g], g
    out_labels = torch.where(out_gt >= 0, labels[out_gt.clamp(min=0)], num_classes)
    return out_labels, out_gt, torch.stack(thresholds)


def test_matches_a_per_gt_reference_on_random_scenes():
    g = torch.Generator().manual_seed(0)
    strides, sizes = [8, 16, 32], [(8, 8), (4, 4), (2, 2)]
    points, level_strides = [], []
    for s, (h, w) in zip(strides, sizes):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pts = torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=1)
        points.append(pts + torch.rand(pts.shape, generator=g) * 0.1)  # jitter: no distance ties
        level_strides.append(torch.full((h * w,), float(s)))
    points, level_strides = torch.cat(points), torch.cat(level_strides)
    anchors = square_anchors(points, level_strides, 8.0)
    num_per_level = [h * w for h, w in sizes]
    for trial in range(5):
        xy = torch.rand(6, 2, generator=g) * 56
        wh = torch.rand(6, 2, generator=g) * 40 + 2
        gts = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, C, (6,), generator=g)
        valid = torch.rand(anchors.shape[0], generator=g) > 0.2
        res = atss_assign(anchors, num_per_level, gts, labels, C, valid=valid, topk=5)
        ref_labels, ref_gt, ref_thr = reference_atss(anchors, num_per_level, gts, labels, C, valid, 5)
        assert torch.allclose(res.pos_thresholds, ref_thr, atol=FP32_FEW_OPS)
        assert torch.equal(res.matched_gt, ref_gt)
        assert torch.equal(res.labels, ref_labels)
        assert res.pos_mask.sum() > 0
