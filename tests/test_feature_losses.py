"""Feature imitation on literal maps: PKD (Pearson-normalised features) and the reference LD rule
that a level without student positives contributes nothing (``feature`` with ``legacy: true``).

Expected values are derived by hand in each test; fp32 tolerances are a few ulps of O(1) results
(``FP32_FEW_OPS``: ≤ 16 roundings times a margin of 10, tests/tolerances.py), or exact where both sides
run the same ops.
"""
import pytest
import torch
from tolerances import FP32_FEW_OPS, fp32_chain

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.losses import create_loss, pearson_normalise
from distill.ops.grid import dense_points, valid_locations
from distill.structures import BoxBins, DenseOutputs, DetectorSpec, Matches, Pairs

FEW_ULPS = FP32_FEW_OPS  # O(1) values through a handful of fp32 ops: ≤ 16·2^-24, times 10 (≈ 9.5e-6)


def side(features: list[torch.Tensor], strides: tuple[int, ...], image_hw=None, matches=None) -> DistillInputs:
    """A dense side whose only content is its FPN maps (per level (B, C, H, W)); head outputs are zeros
    on the same grid so pairers can read the valid locations. ``image_hw``: (B, 2) or None (full canvas)."""
    sizes = [tuple(f.shape[-2:]) for f in features]
    b, c = features[0].shape[:2]
    points, point_strides = dense_points(tuple(sizes), strides, torch.device("cpu"))
    n = points.shape[0]
    image_sizes = None if image_hw is None else torch.tensor(image_hw)
    bins = BoxBins(torch.zeros(b, n, 4, 5), points[None], point_strides.reshape(1, -1, 1))
    preds = DenseOutputs(
        logits=torch.zeros(b, n, 1), boxes=bins.decode(), valid=valid_locations(points, image_sizes, b), bins=bins,
        points=points, strides=point_strides, level_sizes=sizes,
    )
    return DistillInputs(DetectorSpec("dense", 1, strides, c, 5), preds, features, matches, image_sizes)


def value(loss, student: DistillInputs, teacher: DistillInputs, mask=None) -> torch.Tensor:
    loss.check_pair(student.spec, teacher.spec)
    pairs = Pairs.from_mask(mask, loss.space) if mask is not None else loss.pairer(student, teacher, [], loss.space)
    return loss(student, teacher, pairs)


def maps(*levels) -> list[torch.Tensor]:
    """Literal per-level values (B, C, H, W) from nested lists."""
    return [torch.tensor(level, dtype=torch.float32) for level in levels]


# --- PKD --------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher,expected", [([3.0, 1.0], 2.0), ([1.0, 3.0], 0.0), ([5.0, 7.0], 0.0)])
def test_pkd_is_one_minus_the_pearson_correlation_on_a_whole_map(teacher, expected):
    # student [0, 2] and teacher [3, 1] standardise to [-1, 1] and [1, -1] (mean 1 / 2, population
    # std 1): MSE ((-2)^2 + 2^2) / 2 = 4, halved = 2 = 1 - r with r = -1. [1, 3] and [5, 7]: r = 1, 0.
    loss = create_loss("pkd", pairer="all")
    s = side(maps([[[[0.0, 2.0]]]]), (8,))
    t = side(maps([[[teacher]]]), (8,))
    assert float(value(loss, s, t)) == pytest.approx(expected, rel=FEW_ULPS, abs=1e-6)


def test_pkd_ignores_the_scale_and_offset_of_each_channel():
    g = torch.Generator().manual_seed(0)
    s_map, t_map = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 3, 2, 4, generator=g)
    scaled = s_map * torch.tensor([7.0, 0.01, 300.0])[None, :, None, None] - 3.0
    loss = create_loss("pkd", pairer="all")
    t = side([t_map], (8,))
    # fp32 stores 0.01 s - 3 to ≈ 3 · 2^-24 against deviations of 0.01: other data at condition 300 (tests/tolerances.py)
    assert float(value(loss, side([scaled], (8,)), t)) == pytest.approx(float(value(loss, side([s_map], (8,)), t)), rel=fp32_chain(16, condition=300))


def test_pkd_statistics_are_per_image_and_over_valid_locations_only():
    # image 1 is 8 x 8 inside a 8 x 16 canvas: its second location (centre x = 12) is padding.
    s_map = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 50.0]]]])
    t_map = torch.tensor([[[[3.0, 1.0]]], [[[9.0, -4.0]]]])
    loss = create_loss("pkd", pairer="all")
    both = value(loss, side([s_map], (8,), [[8, 16], [8, 8]]), side([t_map], (8,), [[8, 16], [8, 8]]))
    # image 0: two rows of squared error 4 each (test above); image 1: one valid location, standardised
    # to 0 on both sides (variance 0): error 0. Mean over the 3 valid rows, halved: (4 + 4 + 0) / 3 / 2.
    assert float(both) == pytest.approx(8 / 6, rel=FEW_ULPS)
    changed = s_map.clone()
    changed[1, 0, 0, 1] = -1e3  # padding: moves neither the statistics nor the rows
    assert float(value(loss, side([changed], (8,), [[8, 16], [8, 8]]), side([t_map], (8,), [[8, 16], [8, 8]]))) == float(both)


def test_pkd_normalise_literal_and_constant_channel_has_a_finite_gradient():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 2.0]]]], requires_grad=True)  # (1, 2, 2, 2)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    out = pearson_normalise(x, valid, eps=1e-6)
    # channel 0: mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5; channel 1 constant -> 0
    expected = torch.tensor([[[[-3.0, -1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]]]) / torch.tensor([5.0, 1.0]).sqrt()[None, :, None, None]
    expected[:, 1] = 0.0
    torch.testing.assert_close(out, expected, rtol=FEW_ULPS, atol=1e-6)
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pkd_adapter_maps_channels_and_only_student_and_adapter_get_gradients():
    g = torch.Generator().manual_seed(1)
    s_map = torch.randn(2, 2, 2, 2, generator=g, requires_grad=True)
    t_map = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    loss = create_loss("pkd", pairer="all", student_channels=2, teacher_channels=3)
    out = value(loss, side([s_map], (8,)), side([t_map], (8,)))
    out.backward()
    assert s_map.grad is not None and s_map.grad.abs().sum() > 0
    adapter = dict(loss.named_parameters())
    assert adapter["adapter.weight"].grad.abs().sum() > 0
    # The per-channel standardisation removes any constant shift, so the adapter's bias cannot move
    # the loss: its gradient is 0 up to the rounding of the mean subtraction (it was once exactly 0,
    # so "every parameter gets a non-zero gradient" depended on the random init). Absolute bound: 8
    # O(1) gradient terms that cancel exactly, each a few roundings from exact (FP32_FEW_OPS).
    torch.testing.assert_close(adapter["adapter.bias"].grad, torch.zeros(3), rtol=0, atol=FP32_FEW_OPS)
    assert t_map.grad is None  # the teacher is read detached


def test_pkd_bad_eps_is_a_config_error():
    with pytest.raises(ConfigError, match="eps"):
        create_loss("pkd", eps=0)


# --- reference LD rule: a level without student positives gives 0 -------------------------------


def two_one_location_levels(positive_levels: list[int]):
    """Student maps 0 and teacher maps 1 on two 1 x 1 levels (strides 8, 16), one channel; student
    positives at the given levels (flattened location = level index)."""
    matches = Matches(pred_index=[torch.tensor(positive_levels, dtype=torch.long)], gt_index=[torch.zeros(len(positive_levels), dtype=torch.long)])
    student = side(maps([[[[0.0]]]], [[[[0.0]]]]), (8, 16), matches=matches)
    teacher = side(maps([[[[1.0]]]], [[[[1.0]]]]), (8, 16))
    return student, teacher


@pytest.mark.parametrize("pairer", ["all", "main"])
def test_legacy_feature_gives_zero_on_a_level_without_student_positives(pairer):
    # The reference IMLoss: per level, the mean of (s - t)^2 over the selected elements, summed over
    # levels, overwritten by 0 on a level without positives. Level 0 (positive): 1. Level 1: 0.
    loss = create_loss("feature", pairer=pairer, legacy=True)
    student, teacher = two_one_location_levels([0])
    assert float(value(loss, student, teacher)) == 1.0


def test_legacy_feature_sums_the_levels_that_have_positives():
    loss = create_loss("feature", pairer="all", legacy=True)
    student, teacher = two_one_location_levels([0, 1])
    assert float(value(loss, student, teacher)) == 2.0  # 1 + 1: a mean per level, summed
    student, teacher = two_one_location_levels([])
    student.features[0].requires_grad_()
    out = value(loss, student, teacher)
    assert float(out.detach()) == 0.0 and out.grad_fn is not None  # an exact 0 still connected to the student


def test_non_legacy_feature_keeps_every_selected_level():
    loss = create_loss("feature", pairer="all", relative=False)
    student, teacher = two_one_location_levels([0])
    assert float(value(loss, student, teacher)) == 1.0  # (1 + 1) / (2 rows x 1 channel): both levels count
