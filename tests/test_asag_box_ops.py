"""Box codings of the sparse detectors on literal numbers: bins round trip, xyzr, deltas.

Tolerances: the literals are small dyadic numbers, so +, -, *, / on them are mostly exact and at worst a
few roundings: ``torch.allclose``'s default (rtol 1e-5 ≈ 168 · 2^-24) is > 10x that. Where exp / log
sit in the chain, the bound is derived at the site (tests/tolerances.py).
"""
import torch
from tolerances import FP32_FEW_OPS, fp32_chain

from distill.structures import BoxBins
from students.sparse.box_ops import (
    apply_deltas,
    bin_reference,
    cxcywh_to_xyxy,
    encode_bins,
    normalize_boxes,
    xyxy_to_cxcywh,
    xyxy_to_xyzr,
    xyzr_to_xyxy,
)


def test_bin_reference_and_round_trip_on_literal_numbers():
    proposals = torch.tensor([[[20.0, 40.0, 60.0, 60.0]]])  # centre (40, 50), w 40, h 20
    centers, spacing = bin_reference(proposals, 0.125)
    assert centers.tolist() == [[[40.0, 50.0]]]
    assert spacing.tolist() == [[[5.0, 2.5, 5.0, 2.5]]]  # 1/8 of w, h, w, h
    box = torch.tensor([[[25.0, 45.0, 70.0, 57.5]]])
    bins = BoxBins(torch.zeros(1, 1, 4, 17), centers, spacing)
    # left 40-25 = 15 px = 3 bins; top 50-45 = 5 px = 2 bins; right 30 px = 6 bins; bottom 7.5 px = 3 bins.
    distances = encode_bins(bins, box)
    assert distances.tolist() == [[[3.0, 2.0, 6.0, 3.0]]]
    # One-hot logits at those bins decode back to the box (the integral of a peaked distribution).
    logits = torch.full((1, 1, 4, 17), -1e4)
    for edge, k in enumerate([3, 2, 6, 3]):
        logits[0, 0, edge, k] = 0.0
    assert torch.allclose(BoxBins(logits, centers, spacing).decode(), box)
    # A fractional distance is the expectation of two neighbouring bins.
    logits = torch.full((1, 1, 4, 17), -1e4)
    logits[0, 0, :, 4] = 0.0
    logits[0, 0, :, 5] = 0.0  # each edge at 4.5 bins
    assert torch.allclose(BoxBins(logits, centers, spacing).decode(), torch.tensor([[[17.5, 38.75, 62.5, 61.25]]]))


def test_encode_bins_clamps_to_the_range():
    centers, spacing = bin_reference(torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]), 0.125)  # 1 px per bin
    bins = BoxBins(torch.zeros(1, 1, 4, 17), centers, spacing)
    out = encode_bins(bins, torch.tensor([[[-100.0, 3.0, 5.0, 100.0]]]))
    assert torch.allclose(out, torch.tensor([[[15.99, 1.0, 1.0, 15.99]]]))


def test_xyzr_and_cxcywh_round_trips():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 30.0], [0.0, 0.0, 16.0, 64.0]])
    xyzr = xyxy_to_xyzr(boxes)
    # second box: centre (8, 32), sqrt(16*64) = 32 -> z = 5, r = 0.5 log2(64/16) = 1.
    assert torch.allclose(xyzr[1], torch.tensor([8.0, 32.0, 5.0, 1.0]))
    # log2(w h) (≤ 4 roundings of a value ≤ 12) becomes a relative error ln2 · 48 u ≈ 33 u in 2^z, plus
    # exp2's own 4 and a few more: ≈ 40 roundings relative to sides ≤ 64 px
    assert torch.allclose(xyzr_to_xyxy(xyzr), boxes, atol=64 * fp32_chain(40))
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    assert torch.allclose(normalize_boxes(boxes[:1], torch.tensor([100, 200])), torch.tensor([[0.15, 0.25, 0.2, 0.1]]))


def test_apply_deltas_literal():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    assert torch.allclose(apply_deltas(boxes, torch.zeros(1, 4)), boxes)
    # dx 2 -> +1 w = +10 px; dh log 2 -> h 40.
    out = apply_deltas(boxes, torch.tensor([[2.0, 0.0, 0.0, float(torch.log(torch.tensor(2.0)))]]))
    # exp(fp32 log 2) (≤ 6 roundings) times h, then cy ± h / 2: ≤ 16 roundings relative to 40 px
    assert torch.allclose(out, torch.tensor([[10.0, -10.0, 20.0, 30.0]]), atol=40 * FP32_FEW_OPS)
    assert torch.isfinite(apply_deltas(boxes, torch.tensor([[0.0, 0.0, 1e4, 1e4]]))).all()  # clamped exp
