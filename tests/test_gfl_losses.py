import math

import pytest
import torch
from tolerances import FP32_FEW_OPS, FP32_FEW_OPS_CANCEL, fp32_chain

from students.gfl.losses import distribution_focal_loss, giou_loss, quality_focal_loss

# Expected values are exact (Python floats); the fp32 side is a few roundings (tests/tolerances.py).


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, y: float) -> float:
    """Binary cross-entropy of a logit x against target y, in plain math."""
    p = sigmoid(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# ---------------------------------------------------------------------------------------- QFL


def test_qfl_positive_row_golden():
    logits = torch.tensor([[0.5, -1.0]])
    labels = torch.tensor([0])
    quality = torch.tensor([0.6])
    # class 0 is the GT class: target 0.6, scale |0.6 - sigmoid(0.5)|^2
    #   sigmoid(0.5) = 0.622459; BCE = -(0.6 log 0.622459 + 0.4 log 0.377541) = 0.673288
    #   scale = 0.022459^2 = 5.0443e-4 -> 3.3963e-4
    # class 1: target 0, scale sigmoid(-1)^2 = 0.268941^2 = 0.072329
    #   BCE = -log(1 - 0.268941) = log(1 + e^-1) = 0.313262 -> 0.022658
    pos = bce(0.5, 0.6) * (0.6 - sigmoid(0.5)) ** 2
    neg = bce(-1.0, 0.0) * sigmoid(-1.0) ** 2
    out = quality_focal_loss(logits, labels, quality)
    assert out.shape == (1,)
    # ≤ 16 roundings; 0.6 - sigmoid(0.5) cancels 28x, but that term is 1.5% of the sum
    assert out.item() == pytest.approx(pos + neg, rel=FP32_FEW_OPS_CANCEL)
    assert out.item() == pytest.approx(3.3963e-4 + 0.022658, rel=1e-3)  # the comment's 5-digit arithmetic


def test_qfl_background_row_and_quality_ignored():
    logits = torch.tensor([[2.0, -3.0, 0.0]])
    labels = torch.tensor([3])  # C = 3 -> background
    # every element: BCE(x, 0) * sigmoid(x)^2 = log(1 + e^x) * sigmoid(x)^2
    expected = sum(math.log(1 + math.exp(x)) * sigmoid(x) ** 2 for x in (2.0, -3.0, 0.0))
    for q in (0.0, 0.9):  # quality of a background row has no effect
        out = quality_focal_loss(logits, labels, torch.tensor([q]))
        assert out.item() == pytest.approx(expected, rel=FP32_FEW_OPS)  # softplus and sigmoid^2, no cancellation


def test_qfl_several_rows_and_beta():
    logits = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    labels = torch.tensor([1, 2])  # row 0 positive for class 1, row 1 background
    quality = torch.tensor([0.3, 0.7])
    beta = 1.5
    row0 = bce(1.0, 0.0) * sigmoid(1.0) ** beta + bce(0.0, 0.3) * abs(0.3 - 0.5) ** beta
    row1 = bce(0.0, 0.0) * 0.5**beta + bce(-2.0, 0.0) * sigmoid(-2.0) ** beta
    out = quality_focal_loss(logits, labels, quality, beta=beta)
    assert torch.allclose(out, torch.tensor([row0, row1]), rtol=FP32_FEW_OPS)  # ≤ 16 roundings (pow counted as 4)


def test_qfl_is_zero_for_a_perfect_prediction():
    # sigmoid(x) == quality at the GT class and ~0 elsewhere -> every scale is ~0
    q = 0.8
    logits = torch.tensor([[math.log(q / (1 - q)), -30.0]])
    out = quality_focal_loss(logits, torch.tensor([0]), torch.tensor([q]))
    # fp32 sigmoid(logit(0.8)) is 0.8 within ≈ 5 · 0.8 · 2^-24 ≈ 2.4e-7: scale ≤ 6e-14, times BCE ≈ 0.5
    assert out.item() < 1e-10


def test_qfl_large_logits_finite_with_gradients():
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0]], requires_grad=True)
    labels = torch.tensor([1, 2])
    out = quality_focal_loss(logits, labels, torch.tensor([0.5, 0.0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    # row 0: class 1 has target 0.5 at sigmoid(-100) ~ 0 -> BCE ~ 0.5 * 100 = 50, scale 0.25
    #        class 0 has target 0 at sigmoid(100) = 1 -> BCE = 100, scale 1
    assert out[0].item() == pytest.approx(100 + 0.25 * 50, rel=1e-4)  # exact to e^-100; a few roundings


def test_qfl_half_input_and_empty():
    out = quality_focal_loss(torch.zeros(2, 3, dtype=torch.float16), torch.tensor([0, 3]), torch.tensor([1.0, 0.0]))
    assert out.dtype == torch.float32
    empty = quality_focal_loss(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (0,)


def test_qfl_quality_gets_no_gradient():
    quality = torch.tensor([0.5], requires_grad=True)
    logits = torch.tensor([[0.3]], requires_grad=True)
    quality_focal_loss(logits, torch.tensor([0]), quality).sum().backward()
    assert quality.grad is None and logits.grad is not None


# ---------------------------------------------------------------------------------------- DFL


def test_dfl_interpolates_neighbouring_bins():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0]])
    # log-sum-exp = log(1 + e + e^2 + e^3 + 1); CE(k) = lse - logit_k
    lse = math.log(2 + math.e + math.e**2 + math.e**3)
    # target 2.3: 0.7 * CE(bin 2) + 0.3 * CE(bin 3)
    expected = 0.7 * (lse - 2.0) + 0.3 * (lse - 3.0)
    out = distribution_focal_loss(logits, torch.tensor([2.3]))
    assert out.shape == (1,)
    # ≤ 16 roundings of lse ≈ 3.46 against a result of 1.16: condition 3
    assert out.item() == pytest.approx(expected, rel=fp32_chain(16, condition=3))


def test_dfl_integer_target_and_last_bin():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    # row 0, target 1.0: all weight on bin 1, p = 3 / 5 -> CE = log(5 / 3)
    # row 1, target 2.0 = R: all weight on bin 2 (no bin 3 is read), p = 1/3 -> log 3
    out = distribution_focal_loss(logits, torch.tensor([1.0, 2.0]))
    # lse = ln 5 against CE = ln(5/3): condition 3, as above
    assert torch.allclose(out, torch.tensor([math.log(5 / 3), math.log(3.0)]), rtol=fp32_chain(16, condition=3))


def test_dfl_batch_large_logits_and_empty():
    logits = torch.tensor([[100.0, -100.0, 0.0, 0.0], [-100.0, -100.0, -100.0, 100.0]], requires_grad=True)
    out = distribution_focal_loss(logits, torch.tensor([0.5, 2.9]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    # row 0: CE(bin 0) ~ 0, CE(bin 1) ~ 200 -> 0.5 * 200 = 100
    # row 1: CE(bin 2) ~ 200 weighted 0.1, CE(bin 3) ~ 0 -> 20
    assert torch.allclose(out.detach(), torch.tensor([100.0, 20.0]), rtol=1e-4)  # exact to e^-100, fp32(2.9) to 1e-7
    assert distribution_focal_loss(torch.zeros(0, 17), torch.zeros(0)).shape == (0,)


# ---------------------------------------------------------------------------------------- GIoU


def test_giou_loss_literal():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    # row 0: inter 1, union 4 + 4 - 1 = 7, enclosing (0,0,3,3) = 9
    #        GIoU = 1/7 - (9 - 7)/9 = -5/63 -> loss 68/63
    # row 1: disjoint, union 2, enclosing (0,0,3,1) = 3 -> GIoU = 0 - 1/3 -> loss 4/3
    # row 2: identical -> 0
    out = giou_loss(pred, target)
    # allclose keeps its rtol 1e-5: ≥ 1e-5 · 1.08 against ≤ 16 roundings of values ≤ 9 (≈ 1e-6 of the result)
    assert torch.allclose(out, torch.tensor([68 / 63, 4 / 3, 0.0]), atol=1e-6)


def test_giou_loss_empty_and_half():
    assert giou_loss(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)
    out = giou_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]).half(), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(68 / 63, rel=FP32_FEW_OPS)
