"""Golden values of the distillation kernels and losses, computed by hand on tiny literal tensors.

Useful identities for checking the comments: softmax([a, 0]) = (sigmoid(a), sigmoid(-a)), so a
2-bin softmax KL equals a one-class binary KL; softmax([ln 3, 0]) = (3/4, 1/4).

Tolerances (derived, see tests/tolerances.py), the expected values being exact (computed in fp64):

* ``FP32_FEW_OPS`` ≈ 9.5e-6 for weighted means, squared errors, L1 / GIoU rows: ≤ 16 fp32 roundings
  on O(1) values, no cancellation worth counting.
* ``KL_REL`` ≈ 9.5e-4 for a KL divergence: it is a difference of log-probabilities, so its absolute
  error is ~16 roundings of |log p| ≤ ln 4 ≈ 1.4, and relative to the KL that is amplified by
  |log p| / KL: up to 77 here (T = 2, 3 bins: KL 0.0142 vs ln 3). Condition 100.
* T = 10 (LD's default) softens ln(1, 2, 1) to a KL of 5.4e-4 against |log p| = ln 3: condition
  2000, so fp32 guarantees only ``fp32_chain(16, 2000)`` ≈ 2e-2; the same value is pinned in fp64
  at ``FP64_SAME_MATH``, where that condition still leaves rounding ~1e-12.
"""
from __future__ import annotations

import math

import pytest
import torch
from tolerances import FP32_FEW_OPS, FP64_SAME_MATH, fp32_chain
from torch import Tensor

from distill.engine.device import Runtime
from distill.errors import ConfigError
from distill.losses import (
    DistillInputs,
    binary_kl,
    box_rows,
    create_loss,
    kd_rows,
    ld_rows,
    mimic_rows,
    resample_bins,
    softmax_kl,
    weighted_sum,
)
from distill.structures import Matches, Pairs, Predictions
from students.gfl.head import dense_outputs

LN3 = math.log(3.0)
KL_REL = fp32_chain(16, condition=100)


def unflatten(flat: Tensor, level_sizes: list[tuple[int, int]]) -> list[Tensor]:
    """(B, N, D) -> per level (B, D, H_l, W_l)."""
    maps, start = [], 0
    for h, w in level_sizes:
        maps.append(flat[:, start : start + h * w].transpose(1, 2).reshape(flat.shape[0], flat.shape[2], h, w))
        start += h * w
    return maps


def side(level_sizes, cls: Tensor | None = None, reg: Tensor | None = None, feat: Tensor | None = None,
         matches: Matches | None = None) -> DistillInputs:
    """DistillInputs from flat literals: cls (B, N, C), reg (B, N, 4, K), feat (B, N, F)."""
    outputs = None
    if cls is not None or reg is not None:
        b, n = (cls if cls is not None else reg).shape[:2]
        cls = cls if cls is not None else torch.zeros(b, n, 1)
        reg = reg if reg is not None else torch.zeros(b, n, 4, 2)
        outputs = dense_outputs(
            unflatten(cls, level_sizes), unflatten(reg.flatten(2), level_sizes), torch.zeros(n, 2), torch.ones(n), level_sizes, None
        )
    features = unflatten(feat, level_sizes) if feat is not None else None
    return DistillInputs(predictions=outputs, features=features, matches=matches)


def quality_matches(quality: Tensor) -> Matches:
    """Matches whose positives are the locations with quality > 0, weighted by it; quality (B, N)."""
    pred_index = [row.nonzero(as_tuple=True)[0] for row in quality > 0]
    return Matches(
        pred_index=pred_index,
        gt_index=[torch.zeros(len(i), dtype=torch.long) for i in pred_index],
        weight=[quality[b, i] for b, i in enumerate(pred_index)],
    )


def call(loss, student: DistillInputs, teacher: DistillInputs, mask: Tensor) -> Tensor:
    """The loss on the dense pairs of a (B, N) region mask (student index = teacher index)."""
    return loss(student, teacher, Pairs.from_mask(mask, loss.space))


# --- kernels ----------------------------------------------------------------------------------


def test_softmax_kl_two_bins():
    s = torch.tensor([[LN3, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    # T = 1: q = (3/4, 1/4), p = (1/2, 1/2).
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3) = 0.143841; mean over 2 bins = 0.0719205
    assert softmax_kl(s, t, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=KL_REL)
    assert softmax_kl(s, t, 1.0).item() == pytest.approx(0.0719205, rel=KL_REL)
    # T = 2: q = softmax(ln(3)/2, 0) = (sqrt3, 1) / (1 + sqrt3) = (0.633975, 0.366025)
    # KL = 1/2 ln(0.5/0.633975) + 1/2 ln(0.5/0.366025) = 1/2 ln(1.077350) = 0.0372523; /2 bins x T^2 = 0.0745046
    q0 = math.sqrt(3) / (1 + math.sqrt(3))
    kl = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    assert softmax_kl(s, t, 2.0).item() == pytest.approx(4 * kl / 2, rel=KL_REL)
    assert softmax_kl(s, t, 2.0).item() == pytest.approx(0.0745046, rel=KL_REL)


def test_softmax_kl_three_bins():
    t = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    s = torch.zeros(1, 3)
    # T = 1: p = (1/4, 1/2, 1/4), q = 1/3 each.
    # KL = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8) = 0.0588915; mean over 3 bins = 0.0196305
    assert softmax_kl(s, t, 1.0).item() == pytest.approx(0.5 * math.log(9 / 8) / 3, rel=KL_REL)
    # T = 2: p proportional to (1, sqrt2, 1) = (0.292893, 0.414214, 0.292893); q uniform.
    # KL = sum p ln(3p) = 2 * 0.292893 * ln(0.878680) + 0.414214 * ln(1.242641) = 0.0142206
    # mean /3 = 0.0047402; x T^2 = 0.0189608
    p = [1 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    expected = 4 * sum(pk * math.log(3 * pk) for pk in p) / 3
    assert softmax_kl(s, t, 2.0).item() == pytest.approx(expected, rel=KL_REL)
    assert expected == pytest.approx(0.0189608, rel=1e-5)  # fp64 vs the comment's 6 digits (≤ 3e-6)


def test_binary_kl_two_classes():
    # class 0: student ln 3 vs teacher 0; class 1 identical (contributes 0 to the mean over 2 classes)
    s = torch.tensor([[LN3, 0.7]])
    t = torch.tensor([[0.0, 0.7]])
    # T = 1: p = sigmoid(0) = 1/2, q = sigmoid(ln 3) = 3/4: KL = 1/2 ln(4/3) = 0.143841; /2 classes = 0.0719205
    assert binary_kl(s, t, 1.0).item() == pytest.approx(0.0719205, rel=KL_REL)
    # T = 2: q = sigmoid(ln(3)/2) = 0.633975: KL = 0.0372523; /2 classes x 4 = 0.0745046
    assert binary_kl(s, t, 2.0).item() == pytest.approx(0.0745046, rel=KL_REL)


def test_weighted_sum_is_exactly_zero_without_weight():
    assert weighted_sum(torch.tensor([1.0, 2.0]), torch.zeros(2), 0.0).item() == 0.0
    assert weighted_sum(torch.zeros(0), torch.zeros(0), torch.tensor(0.0)).item() == 0.0
    # (2 * 1 + 1 * 2) / 4 = 1
    assert weighted_sum(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), 4.0).item() == 1.0


@pytest.mark.parametrize(
    "kernel",
    [
        lambda s, t, w: kd_rows(s, t, w, w.sum(), 2.0, "bce"),
        lambda s, t, w: kd_rows(s, t, w, w.sum(), 2.0, "softmax"),
        lambda s, t, w: ld_rows(s, t, w, w.sum(), 10.0),
        lambda s, t, w: ld_rows(s, t[:, :3], w, w.sum(), 10.0, "distance"),
        lambda s, t, w: mimic_rows(s, t, w, w.sum()),
    ],
    ids=["kd_bce", "kd_softmax", "ld", "ld_resampled", "mimic"],
)
def test_row_kernels_compute_in_fp32(kernel):
    # The row kernels are public (a cached teacher feeds them gathered rows): fp16 rows must give the
    # fp32 result of the same values, not an fp16 one.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g).half(), torch.randn(6, 4, generator=g).half()
    w = torch.rand(6, generator=g)
    value = kernel(s, t, w)
    assert value.dtype == torch.float32
    # the kernel upcasts first, then runs the same ops on the same shapes in this process: the same bits
    torch.testing.assert_close(value, kernel(s.float(), t.float(), w), rtol=0, atol=0)


# --- kd ---------------------------------------------------------------------------------------


def kd_case():
    """Levels [(1, 2), (1, 1)]: locations 0, 1 on level 0, location 2 on level 1; 2 classes.

    Per-row binary KL at T = 1 (mean over the 2 classes), with a = 1/2 ln(4/3) / 2 = 0.0719205:
    loc 0: s = (ln3, 0), t = (0, 0) -> a;  loc 1: s = t -> 0;  loc 2: s = (ln3, ln3), t = 0 -> 2a.
    """
    levels = [(1, 2), (1, 1)]
    s = torch.tensor([[[LN3, 0.0], [0.4, -0.3], [LN3, LN3]]])
    t = torch.tensor([[[0.0, 0.0], [0.4, -0.3], [0.0, 0.0]]])
    return side(levels, cls=s), side(levels, cls=t)


def test_kd_normalised_is_the_weighted_mean_over_rows():
    student, teacher = kd_case()
    a = 0.5 * math.log(4 / 3) / 2
    loss = create_loss("kd", temperature=1.0)
    # mask (1, 1, 1): (a + 0 + 2a) / 3 = a
    assert call(loss, student, teacher, torch.ones(1, 3)).item() == pytest.approx(a, rel=KL_REL)
    # mask (0.5, 1, 0): (0.5 a + 0) / 1.5 = a / 3
    assert call(loss, student, teacher, torch.tensor([[0.5, 1.0, 0.0]])).item() == pytest.approx(a / 3, rel=KL_REL)


def test_kd_legacy_sums_per_level_means():
    student, teacher = kd_case()
    a = 0.5 * math.log(4 / 3) / 2
    loss = create_loss("kd", temperature=1.0, legacy=True)
    # level 0: (a + 0) / 2; level 1: 2a / 1 -> 2.5 a = 0.1798013
    assert call(loss, student, teacher, torch.ones(1, 3)).item() == pytest.approx(2.5 * a, rel=KL_REL)


def test_kd_softmax_mode_three_classes():
    levels = [(1, 1)]
    student = side(levels, cls=torch.tensor([[[math.log(2.0), 0.0, 0.0]]]))
    teacher = side(levels, cls=torch.zeros(1, 1, 3))
    # q = (1/2, 1/4, 1/4), p = 1/3 each: KL = 1/3 ln(2/3) + 2/3 ln(4/3) = 0.056633; mean /3 = 0.018878
    expected = (math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3) / 3
    value = call(create_loss("kd", temperature=1.0, mode="softmax"), student, teacher, torch.ones(1, 1))
    assert value.item() == pytest.approx(expected, rel=KL_REL)


# --- ld ---------------------------------------------------------------------------------------


def ld_case():
    """One level (1, 2), reg_max 2 (3 bins). Teacher edges: logits ln(1, 2, 1) everywhere.

    Student location 0: zero logits on every edge -> row KL at T = 1 is
    c = 1/2 ln(9/8) / 3 = 0.0196305 (see test_softmax_kl_three_bins); location 1 equals the teacher.
    Student quality weights w = (0.5, 1.0), both positives.
    """
    levels = [(1, 2)]
    t = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 2, 4, 3).clone()
    s = t.clone()
    s[0, 0] = 0.0
    matches = quality_matches(torch.tensor([[0.5, 1.0]]))
    return side(levels, reg=s, matches=matches), side(levels, reg=t)


C_LD = 0.5 * math.log(9 / 8) / 3


def test_ld_main_normalised_by_the_sum_of_row_weights():
    student, teacher = ld_case()
    mask = torch.ones(1, 2)
    # rows: 4 edges x w = 0.5 with KL c, 4 edges x w = 1 with KL 0: (4 * 0.5 c) / (4 * 0.5 + 4 * 1) = c / 3
    assert call(create_loss("ld", temperature=1.0), student, teacher, mask).item() == pytest.approx(C_LD / 3, rel=KL_REL)
    # without quality weights: 4 c / 8 = c / 2
    value = call(create_loss("ld", temperature=1.0, weight_by_quality=False), student, teacher, mask)
    assert value.item() == pytest.approx(C_LD / 2, rel=KL_REL)


def test_ld_main_legacy_divides_by_four():
    student, teacher = ld_case()
    # reference Main LD: sum of w * KL over edges / 4 = 4 * 0.5 * c / 4 = 0.5 c = 0.00981525
    value = call(create_loss("ld", temperature=1.0, legacy=True), student, teacher, torch.ones(1, 2))
    assert value.item() == pytest.approx(0.5 * C_LD, rel=KL_REL)


def test_ld_vlr_weights_by_the_mask_and_legacy_divides_by_sixteen():
    student, teacher = ld_case()
    mask = torch.tensor([[0.3, 0.0]])  # VLR weight = IoU 0.3 at location 0 only
    # normalised: (4 * 0.3 c) / (4 * 0.3) = c
    normalised = call(create_loss("ld", pairer="vlr", temperature=1.0), student, teacher, mask)
    assert normalised.item() == pytest.approx(C_LD, rel=KL_REL)
    # legacy: 4 * 0.3 c / 16 = 0.075 c
    legacy = call(create_loss("ld", pairer="vlr", temperature=1.0, legacy=True), student, teacher, mask)
    assert legacy.item() == pytest.approx(0.075 * C_LD, rel=KL_REL)


def test_ld_temperature_two_and_default_ten():
    student, teacher = ld_case()
    mask = torch.tensor([[1.0, 0.0]])
    # T = 2: row KL = 0.0189608 (test_softmax_kl_three_bins); all rows equal, so the weighted mean is it
    p = [1 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    expected_t2 = 4 * sum(pk * math.log(3 * pk) for pk in p) / 3
    assert call(create_loss("ld", temperature=2.0), student, teacher, mask).item() == pytest.approx(expected_t2, rel=KL_REL)
    # T = 10 (default): p proportional to (1, 2^0.1, 1); 100 * mean_k p_k ln(3 p_k)
    z = 2 + 2**0.1
    p = [1 / z, 2**0.1 / z, 1 / z]
    expected_t10 = 100 * sum(pk * math.log(3 * pk) for pk in p) / 3
    assert call(create_loss("ld"), student, teacher, mask).item() == pytest.approx(expected_t10, rel=fp32_chain(16, 2000))
    with Runtime(dtype="float64").precision():  # the same case in fp64: rounding ~2000 · 16 · 2^-53 ≈ 4e-12
        student, teacher = ld_case()
        value = call(create_loss("ld"), student, teacher, mask.double())
    assert value.dtype == torch.float64 and value.item() == pytest.approx(expected_t10, rel=FP64_SAME_MATH)


# --- bin resampling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs, num_bins, mode, expected",
    [
        # 3 -> 2 bins by distance: bins 0, 1 stay; bin 2 (distance 2) is beyond the student's range -> bin 1
        ([0.25, 0.5, 0.25], 2, "distance", [0.25, 0.75]),
        # 3 -> 2 by scale: positions 0, 0.5, 1 -> bin 0 gets 0.25 + 0.5/2, bin 1 gets 0.5/2 + 0.25
        ([0.25, 0.5, 0.25], 2, "scale", [0.5, 0.5]),
        # 2 -> 3 by distance: the student's bin 2 gets no mass
        ([0.3, 0.7], 3, "distance", [0.3, 0.7, 0.0]),
        # 2 -> 3 by scale: positions 0 and 2
        ([0.3, 0.7], 3, "scale", [0.3, 0.0, 0.7]),
        # 3 -> 4 by scale: positions 0, 1.5, 3 -> 0.25, 0.5/2, 0.5/2, 0.25
        ([0.25, 0.5, 0.25], 4, "scale", [0.25, 0.25, 0.25, 0.25]),
    ],
)
def test_resample_bins(probs, num_bins, mode, expected):
    out = resample_bins(torch.tensor([probs]), num_bins, mode)
    # ≤ 2 fp32 roundings per bin on values ≤ 1: the default atol 1e-5 is > 10 · 2 · 2^-24
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_ld_rows_with_resampled_teacher():
    # teacher 3 bins ln(1, 2, 1) at T = 1 -> p = (1/4, 1/2, 1/4) -> by distance (1/4, 3/4);
    # student 2 bins, zero logits -> q = (1/2, 1/2).
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; mean over 2 bins = 0.065406
    t = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    s = torch.zeros(1, 2)
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    value = ld_rows(s, t, torch.ones(1), 1.0, temperature=1.0, resample="distance")
    assert value.item() == pytest.approx(expected, rel=KL_REL)


# --- feature ----------------------------------------------------------------------------------


def feature_case():
    """Levels [(1, 2), (1, 1)], 2 channels. Squared errors per location:
    loc 0: (1, 2) vs (0, 1) -> 1 + 1 = 2;  loc 1: (3, 0) vs (1, 0) -> 4;  loc 2: (0, 0) vs (3, 0) -> 9."""
    levels = [(1, 2), (1, 1)]
    s = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]])
    return side(levels, feat=s), side(levels, feat=t)


def test_feature_mse_per_masked_location_and_channel():
    student, teacher = feature_case()
    mask = torch.tensor([[1.0, 0.5, 1.0]])
    # (1 * 2 + 0.5 * 4 + 1 * 9) / (2 channels * (1 + 0.5 + 1)) = 13 / 5
    assert call(create_loss("feature", relative=False), student, teacher, mask).item() == pytest.approx(13 / 5, rel=FP32_FEW_OPS)


def test_feature_relative_error_divides_by_teacher_energy():
    student, teacher = feature_case()
    mask = torch.tensor([[1.0, 0.5, 1.0]])
    # teacher energy ||t||^2 per location: 1, 1, 9 -> 1 * 1 + 0.5 * 1 + 1 * 9 = 10.5
    # weighted squared error as above: 13 -> 13 / 10.5
    assert call(create_loss("feature"), student, teacher, mask).item() == pytest.approx(13 / 10.5, rel=FP32_FEW_OPS)
    # scale-free: multiplying both sides by 100 leaves the value unchanged
    levels = [(1, 2), (1, 1)]
    big_s = side(levels, feat=100 * torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]]))
    big_t = side(levels, feat=100 * torch.tensor([[[0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]]))
    assert call(create_loss("feature"), big_s, big_t, mask).item() == pytest.approx(13 / 10.5, rel=FP32_FEW_OPS)
    # level 0 only: (2 + 2) / (2 * 1.5) = 4 / 3
    assert call(create_loss("feature", level_indices=[0], relative=False), student, teacher, mask).item() == pytest.approx(4 / 3, rel=FP32_FEW_OPS)


def test_feature_legacy_sums_per_level_means():
    student, teacher = feature_case()
    mask = torch.tensor([[1.0, 0.5, 1.0]])
    # student positives on both levels (locations 0 and 2): level 0: (1 * 2 + 0.5 * 4) / (2 * 1.5) = 4 / 3;
    # level 1: 9 / (2 * 1) = 4.5 -> 35 / 6
    student.matches = Matches(pred_index=[torch.tensor([0, 2])], gt_index=[torch.tensor([0, 0])])
    value = call(create_loss("feature", legacy=True), student, teacher, mask)
    assert value.item() == pytest.approx(4 / 3 + 4.5, rel=FP32_FEW_OPS)
    # no positive on level 1: the reference overwrites that level's loss with 0
    student.matches = Matches(pred_index=[torch.tensor([1])], gt_index=[torch.tensor([0])])
    assert call(create_loss("feature", legacy=True), student, teacher, mask).item() == pytest.approx(4 / 3, rel=FP32_FEW_OPS)


def test_feature_adapter_is_a_per_location_linear_map():
    levels = [(1, 2)]
    loss = create_loss("feature", student_channels=1, teacher_channels=2, relative=False)
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.tensor([[[[2.0]]], [[[-1.0]]]]))  # (C_t, C_s, 1, 1)
        loss.adapter.bias.copy_(torch.tensor([0.0, 1.0]))
    # student 1 -> (2, 0) = teacher (2, 0): error 0; student 3 -> (6, -2) vs teacher (5, -2): error 1
    student = side(levels, feat=torch.tensor([[[1.0], [3.0]]]))
    teacher = side(levels, feat=torch.tensor([[[2.0, 0.0], [5.0, -2.0]]]))
    # (0 + 1) / (2 channels * 2 locations) = 0.25
    assert call(loss, student, teacher, torch.ones(1, 2)).item() == pytest.approx(0.25, rel=FP32_FEW_OPS)


def test_ld_count_normalisation_is_mean_of_weighted_rows():
    # Two locations selected with weights 0.5 and 1 (as main LD's quality weights would be), T = 1.
    # Student bins uniform q = (1/2, 1/2); teacher rows p = (1/4, 3/4) on every edge of location 0 and
    # p = q on location 1 (KL 0). Row KL of location 0 = (1/4 ln(1/2) + 3/4 ln(3/2)) / 2 bins.
    kl0 = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    rows_w = torch.tensor([0.5] * 4 + [1.0] * 4)
    s = torch.zeros(8, 2)
    t = torch.log(torch.tensor([[1.0, 3.0]] * 4 + [[1.0, 1.0]] * 4))
    # "weight": sum w*KL / sum w = 4 * 0.5 * kl0 / 6;  "count": sum w*KL / 8 rows = 4 * 0.5 * kl0 / 8
    assert ld_rows(s, t, rows_w, rows_w.sum(), temperature=1.0).item() == pytest.approx(2 * kl0 / 6, rel=KL_REL)
    assert ld_rows(s, t, rows_w, 8.0, temperature=1.0).item() == pytest.approx(2 * kl0 / 8, rel=KL_REL)


def test_ld_count_mode_uses_the_number_of_distilled_edges():
    with pytest.raises(ConfigError, match="normalize must be"):
        create_loss("ld", normalize="sum")
    student, teacher = ld_case()
    # main LD, count mode: (4 edges * w 0.5 * c + 4 * 1.0 * 0) / 8 distilled edges = c / 4
    value = call(create_loss("ld", temperature=1.0, normalize="count"), student, teacher, torch.ones(1, 2))
    assert value.item() == pytest.approx(C_LD / 4, rel=KL_REL)
    # halving every quality weight halves the value (the warm-up), unlike the default weighted mean
    half, _ = ld_case()
    half.matches.weight[0].mul_(0.5)
    assert call(create_loss("ld", temperature=1.0, normalize="count"), half, teacher, torch.ones(1, 2)).item() == pytest.approx(C_LD / 8, rel=KL_REL)
    assert call(create_loss("ld", temperature=1.0), half, teacher, torch.ones(1, 2)).item() == pytest.approx(C_LD / 3, rel=KL_REL)


# --- box --------------------------------------------------------------------------------------


def box_case():
    """Two matched pairs, read with each side's own index (student and teacher sets differ in size).

    Pair A: image 0 (h 10, w 20), student 1 = [0, 0, 4, 4] vs teacher 2 = [2, 0, 6, 4], weight 1.
      L1 / (w, h, w, h) = 2/20 + 0 + 2/20 + 0 = 0.2;  inter [2, 0, 4, 4] = 8, union 16 + 16 - 8 = 24,
      IoU 1/3, enclosing [0, 0, 6, 4] = 24 = union -> GIoU 1/3, 1 - GIoU = 2/3.
    Pair B: image 1 (h 20, w 40), student 0 = [0, 0, 2, 2] vs teacher 1 = [4, 4, 6, 6], weight 3.
      L1 = 4/40 + 4/20 + 4/40 + 4/20 = 0.6;  disjoint: IoU 0, union 8, enclosing [0, 0, 6, 6] = 36
      -> GIoU = -(36 - 8)/36 = -7/9, 1 - GIoU = 16/9.
    """
    s_boxes = torch.tensor([
        [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0]],
        [[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 9.0, 9.0]],
    ], requires_grad=True)
    t_boxes = torch.tensor([
        [[0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 5.0, 5.0], [2.0, 0.0, 6.0, 4.0]],
        [[0.0, 0.0, 9.0, 9.0], [4.0, 4.0, 6.0, 6.0], [1.0, 2.0, 3.0, 4.0]],
    ])
    sizes = torch.tensor([[10, 20], [20, 40]])  # (height, width)
    student = DistillInputs(predictions=Predictions(torch.zeros(2, 2, 1), s_boxes, torch.ones(2, 2, dtype=torch.bool)), image_sizes=sizes)
    teacher = DistillInputs(predictions=Predictions(torch.zeros(2, 3, 1), t_boxes, torch.ones(2, 3, dtype=torch.bool)), image_sizes=sizes)
    pairs = Pairs(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 1]), torch.tensor([1.0, 3.0]), 2)
    return student, teacher, pairs, s_boxes


def test_box_l1_and_giou_on_two_literal_pairs():
    student, teacher, pairs, s_boxes = box_case()
    # row A: 5 * 0.2 + 2 * 2/3 = 7/3;  row B: 5 * 0.6 + 2 * 16/9 = 59/9
    # weighted mean: (1 * 7/3 + 3 * 59/9) / (1 + 3) = (7/3 + 59/3) / 4 = 5.5
    value = create_loss("box")(student, teacher, pairs)
    assert value.item() == pytest.approx(5.5, rel=FP32_FEW_OPS)
    assert create_loss("box", weight=2.0)(student, teacher, pairs).item() == pytest.approx(11.0, rel=FP32_FEW_OPS)
    # L1 only: (0.2 + 3 * 0.6) / 4 = 0.5;  GIoU only: (2/3 + 3 * 16/9) / 4 = 1.5
    assert create_loss("box", l1_weight=1.0, giou_weight=0.0)(student, teacher, pairs).item() == pytest.approx(0.5, rel=FP32_FEW_OPS)
    assert create_loss("box", l1_weight=0.0, giou_weight=1.0)(student, teacher, pairs).item() == pytest.approx(1.5, rel=FP32_FEW_OPS)
    # only the paired student boxes get a gradient
    value.backward()
    assert (s_boxes.grad[0, 0] == 0).all() and (s_boxes.grad[1, 1] == 0).all()
    assert s_boxes.grad[0, 1].abs().sum() > 0 and s_boxes.grad[1, 0].abs().sum() > 0


def test_box_rows_kernel():
    s = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, 6.0, 4.0], [4.0, 4.0, 6.0, 6.0]])
    scale = torch.tensor([[20.0, 10.0, 20.0, 10.0], [40.0, 20.0, 40.0, 20.0]])
    # the rows of box_case: (7/3 + 3 * 59/9) / 4 = 5.5
    assert box_rows(s, t, scale, torch.tensor([1.0, 3.0]), 5.0, 2.0).item() == pytest.approx(5.5, rel=FP32_FEW_OPS)
    # fp16 rows give the fp32 result; no rows give exactly 0
    half = box_rows(s.half(), t.half(), scale, torch.tensor([1.0, 3.0]), 5.0, 2.0)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(5.5, rel=FP32_FEW_OPS)
    assert box_rows(s[:0], t[:0], scale[:0], torch.zeros(0), 5.0, 2.0).item() == 0.0
