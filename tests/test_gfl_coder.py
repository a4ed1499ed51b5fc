import math

import torch

from students.gfl.coder import decode_boxes, encode_targets, integral

NEG = -1e4  # logit whose softmax weight underflows to exactly 0 next to a 0 logit
# Non-exact cases are a softmax expectation over ≤ 17 bins: ≤ 8 fp32 roundings relative to the result,
# so isclose / allclose's default rtol 1e-5 (≈ 168 · 2^-24) is > 10x (tests/tolerances.py).


def one_hot_logits(bins: list[int], num_bins: int) -> torch.Tensor:
    """(len(bins), num_bins) logits putting all the mass on the given bins."""
    logits = torch.full((len(bins), num_bins), NEG)
    logits[torch.arange(len(bins)), torch.tensor(bins)] = 0.0
    return logits


def test_integral_one_hot_uniform_and_two_bins():
    assert torch.equal(integral(one_hot_logits([0, 3, 16], 17)), torch.tensor([0.0, 3.0, 16.0]))
    # uniform over 0..16: mean = 16 / 2 = 8
    assert torch.isclose(integral(torch.zeros(17)), torch.tensor(8.0))
    # equal mass on bins 2 and 3 only: 0.5 * 2 + 0.5 * 3 = 2.5
    two = torch.full((17,), NEG)
    two[2] = two[3] = 5.0
    assert torch.isclose(integral(two), torch.tensor(2.5))
    # logits (0, log 3) over bins 0, 1: p = (1/4, 3/4) -> 0.75
    assert torch.isclose(integral(torch.tensor([0.0, math.log(3.0)])), torch.tensor(0.75))


def test_integral_half_precision_input_returns_float32():
    out = integral(torch.zeros(2, 4, 17, dtype=torch.float16))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full((2, 4), 8.0))


def test_decode_boxes_literal():
    points = torch.tensor([[12.0, 12.0], [40.0, 8.0]])
    strides = torch.tensor([8.0, 16.0])
    # location 0: edges (1, 2, 3, 4) bins * stride 8 = (8, 16, 24, 32)
    #   -> (12 - 8, 12 - 16, 12 + 24, 12 + 32) = (4, -4, 36, 44)
    # location 1: edges (0, 1, 0, 2) * 16 = (0, 16, 0, 32) -> (40, -8, 40, 40)
    logits = torch.stack([one_hot_logits([1, 2, 3, 4], 17), one_hot_logits([0, 1, 0, 2], 17)])  # (2, 4, 17)
    expected = torch.tensor([[4.0, -4.0, 36.0, 44.0], [40.0, -8.0, 40.0, 40.0]])
    assert torch.equal(decode_boxes(points, strides, logits), expected)
    # batched (B, N, 4, R + 1) -> (B, N, 4)
    batched = decode_boxes(points, strides, logits.expand(3, -1, -1, -1))
    assert batched.shape == (3, 2, 4) and torch.equal(batched[2], expected)


def test_encode_targets_literal_and_clamp():
    points = torch.tensor([[12.0, 12.0], [12.0, 12.0], [100.0, 100.0]])
    strides = torch.tensor([8.0, 8.0, 8.0])
    boxes = torch.tensor(
        [
            [4.0, -4.0, 36.0, 44.0],  # (8, 16, 24, 32) px / 8 = (1, 2, 3, 4)
            [4.0, 8.0, 1000.0, 20.0],  # (1, 0.5, 123.5 -> 15.9, 1)
            [0.0, 0.0, 50.0, 50.0],  # point outside: (12.5, 12.5, -6.25 -> 0, -6.25 -> 0)
        ]
    )
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 15.9, 1.0], [12.5, 12.5, 0.0, 0.0]])
    assert torch.allclose(encode_targets(points, strides, boxes, reg_max=16), expected)


def test_encode_then_decode_round_trip():
    points = torch.tensor([[12.0, 12.0], [40.0, 8.0]])
    strides = torch.tensor([8.0, 16.0])
    boxes = torch.tensor([[4.0, -4.0, 36.0, 44.0], [40.0, -8.0, 40.0, 40.0]])
    targets = encode_targets(points, strides, boxes, reg_max=16)  # integral distances in bins
    logits = torch.stack([one_hot_logits(t.long().tolist(), 17) for t in targets])
    assert torch.equal(decode_boxes(points, strides, logits), boxes)
