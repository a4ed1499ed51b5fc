"""Set criterion: Query Weighting golden values (by hand), loss terms, normaliser, empty images."""
import math

import pytest
import torch
from tolerances import FP32_FEW_OPS

from distill.structures import BoxBins, Predictions, Target
from students.sparse.box_ops import bin_reference
from students.sparse.criterion import SetCriterion, num_boxes, query_weights, qw_norm
from students.sparse.matcher import HungarianMatcher

LN2 = math.log(2.0)


def test_qw_norm_golden():
    # sigmoid(-1.5) / sigmoid(3) = 0.182426 / 0.952574; sigmoid(0) / sigmoid(3); 1.
    # 6-digit literals (≤ 5e-7) + ≤ 10 fp32 roundings on values ≤ 1 (≤ 6e-7): atol 1e-5 ≈ 9x
    assert torch.allclose(qw_norm(torch.tensor([0.0, 1 / 3, 1.0])), torch.tensor([0.191509, 0.524897, 1.0]), atol=1e-5)


def test_query_weights_golden_by_hand():
    # Six-digit hand arithmetic, chained (hence atol 1e-4; fp32's own ~30 roundings are ≤ 2e-6). (s, u) = (0.5, 0.8): s^.4 = 0.757858, u^.6 = 0.874691, product 0.662893
    #   w_pos = sigmoid(4.5 (0.662893 - 1/3)) / sigmoid(3) = 0.814986 / 0.952574 = 0.855561
    #   u^.6 >= 0.5: P_neg = (1 - 0.874691^2) / 0.75 = 0.313221; s^.4 P_neg = 0.237377
    #   w_neg = sigmoid(4.5 (0.237377 - 1/3)) / sigmoid(3) - 0.191509 = 0.413299 - 0.191509 = 0.221790
    # (0.5, 1.0): w_pos = Norm(0.757858) = 0.914408; P_neg(1) = 0 -> w_neg = Norm(0) - 0.191509 = 0
    # (0.9, 0.3): s^.4 = 0.958732, u^.6 = 0.485593 < 0.5 -> P_neg = 1
    #   w_pos = Norm(0.465553) = 0.644511 / 0.952574 = 0.676600; w_neg = Norm(0.958732) - 0.191509 = 0.798880
    w_pos, w_neg = query_weights(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([0.8, 1.0, 0.3]))
    assert torch.allclose(w_pos, torch.tensor([0.855561, 0.914408, 0.676600]), atol=1e-4)
    assert torch.allclose(w_neg, torch.tensor([0.221790, 0.0, 0.798880]), atol=1e-4)


def test_query_weights_ranges():
    s, u = torch.rand(1000), torch.rand(1000)
    w_pos, w_neg = query_weights(s, u)
    # analytic range [Norm(0), Norm(1)] = [0.191509, 1] for w_pos and [0, 0.808491] for w_neg, each end
    # reached through ≤ 16 fp32 roundings on values ≤ 1 (FP32_FEW_OPS, absolute here)
    assert w_pos.min() >= 0.1915 - 1e-4 and w_pos.max() <= 1.0 + FP32_FEW_OPS
    assert w_neg.min() >= -FP32_FEW_OPS and w_neg.max() <= 0.81


SIZE = torch.tensor([[100, 100]])
GT = [Target(torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([1]))]


def _two_queries(logits=0.0):
    boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]]], requires_grad=True)
    logits = torch.full((1, 2, 2), logits, requires_grad=True)
    return Predictions(logits, boxes, torch.ones(1, 2, dtype=torch.bool))


def test_query_weighted_classification_golden():
    # Query 0 equals the GT (IoU 1) and is matched; every logit 0 (s = 0.5).
    #   matched entry: w_pos BCE(0, 1) + w_neg BCE(0, 0) = 0.914408 ln2 + 0 = 0.633820
    #   3 other entries: BCE(0, 0) sigmoid(0)^2 = ln2 / 4 each = 0.519860
    # loss_cls = 2 * (0.633820 + 0.519860) / 1 GT = 2.307360; perfect box: L1 = GIoU = 0.
    losses, matches = SetCriterion(query_weighting=True)(_two_queries(), GT, SIZE)
    assert matches.pred_index[0].tolist() == [0] and matches.gt_index[0].tolist() == [0]
    # 1e-4: the six-digit hand arithmetic above (fp32's ~30 roundings are ≤ 5e-6 of 2.3)
    assert abs(losses["loss_cls"].item() - 2.307360) < 1e-4
    # the box equals the GT: both go through the same ops, so L1 and 1 - GIoU are exactly 0
    assert losses["loss_l1"].item() == 0.0
    assert losses["loss_giou"].item() == 0.0
    assert torch.allclose(matches.weight[0], torch.tensor([0.914408]), atol=1e-4)  # the box weight used


def test_focal_classification_without_query_weighting():
    # sigmoid focal (alpha .25, gamma 2) at p = 0.5: positive 0.25 * 0.25 * ln2, negatives 0.75 * 0.25 * ln2.
    losses, matches = SetCriterion(query_weighting=False)(_two_queries(), GT, SIZE)
    expected = 2 * (0.25 * 0.25 * LN2 + 3 * 0.75 * 0.25 * LN2)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=FP32_FEW_OPS)  # exact expected, a few fp32 ops
    assert matches.weight[0].tolist() == [1.0]


def test_box_losses_weighted_by_w_pos_and_normalised_by_num_boxes():
    pred = _two_queries()
    pred.boxes.data[0, 0] = torch.tensor([12.0, 10.0, 42.0, 40.0])  # shifted 2 px right: IoU 28/32 = 0.875
    qw, _ = SetCriterion(query_weighting=True)(pred, GT, SIZE)
    plain, _ = SetCriterion(query_weighting=False)(pred, GT, SIZE)
    # L1 of normalised cxcywh: |0.27 - 0.25| = 0.02 -> 5 * 0.02 = 0.1 without weights.
    # (absolute tolerances: the differences cancel values ≤ 1, so fp32 errs by ~10 · 2^-24 ≈ 6e-7 absolute
    # at most, < 1e-5 / 10; 2 * (1 - 0.875) likewise)
    assert plain["loss_l1"].item() == pytest.approx(0.1, abs=1e-5)
    w_pos, _ = query_weights(torch.tensor([0.5]), torch.tensor([28 * 30 / (32 * 30)]))
    assert qw["loss_l1"].item() == pytest.approx(0.1 * w_pos.item(), abs=1e-5)
    giou = 1 - (28 * 30 / (32 * 30))
    assert plain["loss_giou"].item() == pytest.approx(2 * giou, abs=1e-5)
    # Two images, the same GT twice: normaliser 2, so the sums stay the same per box.
    two = Predictions(pred.logits.repeat(2, 1, 1), pred.boxes.repeat(2, 1, 1), pred.valid.repeat(2, 1))
    both, _ = SetCriterion(query_weighting=False)(two, GT * 2, SIZE.repeat(2, 1))
    assert both["loss_l1"].item() == pytest.approx(plain["loss_l1"].item(), abs=1e-6)  # ~8 roundings of 0.1: ≤ 5e-8


def test_query_weighting_never_changes_the_matching():
    torch.manual_seed(0)
    boxes = torch.rand(1, 8, 2) * 50
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(1, 8, 2) * 40], dim=-1)
    pred = Predictions(torch.randn(1, 8, 3), boxes, torch.ones(1, 8, dtype=torch.bool))
    gt = [Target(torch.tensor([[5.0, 5.0, 30.0, 40.0], [40.0, 20.0, 90.0, 70.0]]), torch.tensor([0, 2]))]
    _, a = SetCriterion(query_weighting=True)(pred, gt, SIZE)
    _, b = SetCriterion(query_weighting=False)(pred, gt, SIZE)
    plain = HungarianMatcher()(pred, gt, SIZE)
    assert a.pred_index[0].tolist() == b.pred_index[0].tolist() == plain.pred_index[0].tolist()


def test_num_boxes_counts_the_batch_and_is_at_least_one():
    assert num_boxes([Target.empty(), Target.empty()], "cpu").item() == 1.0
    assert num_boxes(GT * 3 + [Target.empty()], "cpu").item() == 3.0


def test_empty_images_give_finite_losses_and_gradients():
    pred = _two_queries()
    losses, matches = SetCriterion()(pred, [Target.empty()], SIZE)
    assert all(torch.isfinite(v) for v in losses.values())
    assert matches.pred_index[0].numel() == 0
    sum(losses.values()).backward()
    assert pred.logits.grad is not None and pred.boxes.grad is not None  # zero-weighted box branch


def test_invalid_queries_add_no_classification_loss():
    pred = _two_queries(logits=3.0)
    pred.valid[0, 1] = False
    losses, _ = SetCriterion(query_weighting=False)(pred, [Target.empty()], SIZE)
    p = torch.sigmoid(torch.tensor(3.0))
    per_entry = 0.75 * p**2 * -torch.log(1 - p)
    # the naive 1 - p (p = 0.95) cancels ~20x on the test's side: ≈ 60 roundings in all, 3.6e-6; 1e-4 is > 25x
    assert losses["loss_cls"].item() == pytest.approx(2 * 2 * per_entry.item(), rel=1e-4)  # 2 classes of query 0


def test_dfl_term_on_bins_and_aux_heads_named():
    boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]]])
    centers, spacing = bin_reference(boxes, 0.125)  # proposals = the predicted boxes: identity at bin 4
    logits = torch.full((1, 2, 4, 17), -1e4)
    logits[..., 4] = 0.0
    bins = BoxBins(logits.requires_grad_(), centers, spacing)
    aux = Predictions(torch.zeros(1, 2, 2), boxes, torch.ones(1, 2, dtype=torch.bool))
    pred = Predictions(torch.zeros(1, 2, 2), bins.decode(), torch.ones(1, 2, dtype=torch.bool), bins=bins, aux=[aux])
    losses, _ = SetCriterion()(pred, GT, SIZE, aux_names=["prop"])
    # GT edges exactly at bin 4: centres 25 / 75, spacing 3.75, distances 15 are dyadic, so every op is exact,
    # and exp(-1e4) underflows to 0: exactly 0
    assert losses["loss_dfl"].item() == 0.0
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou", "loss_dfl", "loss_cls_prop", "loss_l1_prop", "loss_giou_prop"}
