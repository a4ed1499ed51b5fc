import torch
from tolerances import FP32_FEW_OPS, fp32_chain
from torchvision.ops import box_iou, distance_box_iou

from distill.ops.boxes import (
    bbox2distance,
    box_centers,
    diou_iof_legacy,
    distance2bbox,
    square_anchors,
)


def test_square_anchors_literal():
    points = torch.tensor([[4.0, 4.0], [24.0, 8.0]])
    strides = torch.tensor([8.0, 16.0])
    # side = 8 * stride: 64 around (4, 4), 128 around (24, 8)
    expected = torch.tensor([[-28.0, -28.0, 36.0, 36.0], [-40.0, -56.0, 88.0, 72.0]])
    assert torch.equal(square_anchors(points, strides, 8.0), expected)


def test_distance2bbox_literal_and_clip():
    points = torch.tensor([[10.0, 20.0]])
    dist = torch.tensor([[1.0, 2.0, 3.0, 40.0]])
    # (10 - 1, 20 - 2, 10 + 3, 20 + 40)
    assert torch.equal(distance2bbox(points, dist), torch.tensor([[9.0, 18.0, 13.0, 60.0]]))
    # clipped to (h, w) = (50, 12): x2 13 -> 12, y2 60 -> 50
    clipped = distance2bbox(points, dist, max_shape=(50, 12))
    assert torch.equal(clipped, torch.tensor([[9.0, 18.0, 12.0, 50.0]]))


def test_bbox2distance_literal_and_clamp():
    points = torch.tensor([[10.0, 20.0], [0.0, 0.0]])
    boxes = torch.tensor([[9.0, 18.0, 13.0, 60.0], [5.0, -1.0, 30.0, 2.0]])
    # row 0: (10-9, 20-18, 13-10, 60-20); row 1: (0-5, 0+1, 30-0, 2-0)
    expected = torch.tensor([[1.0, 2.0, 3.0, 40.0], [-5.0, 1.0, 30.0, 2.0]])
    assert torch.equal(bbox2distance(points, boxes), expected)
    # max_dis 16, eps 0.1 -> clamp to [0, 15.9]
    clamped = bbox2distance(points, boxes, max_dis=16)
    assert torch.allclose(clamped, torch.tensor([[1.0, 2.0, 3.0, 15.9], [0.0, 1.0, 15.9, 2.0]]))


def test_distance_box_round_trip_batched():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 7, 2, generator=g) * 100
    dist = torch.rand(2, 7, 4, generator=g) * 50
    boxes = distance2bbox(points, dist)
    assert boxes.shape == (2, 7, 4)
    # p ± d then back: 2 (then 4) roundings of values ≤ 150 px (tests/tolerances.py)
    assert torch.allclose(bbox2distance(points, boxes), dist, atol=150 * fp32_chain(2))
    assert torch.allclose(distance2bbox(points, bbox2distance(points, boxes)), boxes, atol=150 * fp32_chain(4))


def test_box_centers():
    assert torch.equal(box_centers(torch.tensor([[0.0, 2.0, 4.0, 10.0]])), torch.tensor([[2.0, 6.0]]))


def test_diou_iof_legacy_literal():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    gts = torch.tensor([[2.0, 0.0, 10.0, 4.0]])
    # inter = 2 * 4 = 8, area(anchor) = 16 -> IoF = 0.5 (IoU would be 8 / 40 = 0.2)
    # centres (2, 2) and (6, 2): rho^2 = 16; enclosing box (0,0,10,4): c^2 = 100 + 16 = 116
    # D = 0.5 - 16 / 116
    expected = 0.5 - 16 / 116
    assert torch.allclose(diou_iof_legacy(anchors, gts), torch.tensor([[expected]]))
    # the true DIoU for the same pair: 0.2 - 16 / 116
    assert torch.allclose(distance_box_iou(anchors, gts), torch.tensor([[0.2 - 16 / 116]]))


def test_diou_iof_legacy_matches_true_diou_when_gt_inside_anchor():
    g = torch.Generator().manual_seed(1)
    anchors = square_anchors(torch.rand(20, 2, generator=g) * 64, torch.full((20,), 8.0))
    gts = torch.tensor([[30.0, 30.0, 34.0, 36.0], [10.0, 40.0, 12.0, 41.0]])
    legacy = diou_iof_legacy(anchors, gts)
    true = distance_box_iou(anchors, gts)
    inside = (anchors[:, None, :2] <= gts[None, :, :2]).all(-1) & (anchors[:, None, 2:] >= gts[None, :, 2:]).all(-1)
    assert inside.any() and (~inside).any()
    # union == area(anchor) when the GT is inside the anchor, so IoF == IoU there
    # (two codes, ≤ 16 roundings each of values ≤ 1: FP32_FEW_OPS absolute; 1e-5 likewise)
    assert torch.allclose(legacy[inside], true[inside], atol=1e-5)
    # elsewhere IoF >= IoU, so the legacy metric is never below the true DIoU (up to that rounding)
    assert (legacy >= true - FP32_FEW_OPS).all()


def test_diou_iof_legacy_shapes_and_disjoint():
    anchors = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    gts = torch.tensor([[0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    out = diou_iof_legacy(anchors, gts)
    assert out.shape == (3, 2)
    # identical boxes: IoF 1, rho 0
    assert out[0, 0] == 1.0
    # disjoint: inter 0; centres (1,1),(5,1): rho^2 16; enclosing (0,0,6,2): c^2 40 -> -0.4
    assert torch.isclose(out[0, 1], torch.tensor(-0.4))
    assert diou_iof_legacy(anchors, torch.zeros(0, 4)).shape == (3, 0)
    # sanity: IoF matches plain IoU for identical boxes
    assert torch.equal(box_iou(anchors[:1], gts[:1]), torch.ones(1, 1))
