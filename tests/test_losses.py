"""Contract tests for every registered distillation loss, plus the registry and loss-specific options.

A tiny two-level dense output (2x2 at stride 8, 1x2 at stride 16: N = 6 locations), B = 2 images,
3 classes, reg_max 4 and 5-channel features is enough to exercise gathering, weighting and reduction.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from distill.errors import ConfigError
from distill.losses import DistillInputs, DistillLoss, create_loss, list_losses, loss_parameters, register_loss
from distill.pairers import RegionPairer
from distill.structures import DetectorSpec, Matches, Pairs, Predictions, Target
from students.gfl.head import dense_outputs

LEVEL_SIZES = [(2, 2), (1, 2)]
LEVEL_STRIDES = [8, 16]
NUM_IMAGES, NUM_CLASSES, REG_MAX, CHANNELS = 2, 3, 4, 5
NUM_LOCATIONS = sum(h * w for h, w in LEVEL_SIZES)
IMAGE_HW = (16, 32)  # every location centre lies inside; the box loss divides L1 by (w, h, w, h)


def grid(level_sizes=LEVEL_SIZES, level_strides=LEVEL_STRIDES) -> tuple[Tensor, Tensor]:
    """(N, 2) centres ((j + 0.5) s, (i + 0.5) s) and (N,) strides, levels concatenated."""
    points, strides = [], []
    for (h, w), s in zip(level_sizes, level_strides):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        points.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=1))
        strides.append(torch.full((h * w,), float(s)))
    return torch.cat(points), torch.cat(strides)


def unflatten(flat: Tensor, level_sizes=LEVEL_SIZES) -> list[Tensor]:
    """(B, N, D) -> per level (B, D, H_l, W_l): the inverse of DenseOutputs' flattening."""
    maps, start = [], 0
    for h, w in level_sizes:
        chunk = flat[:, start : start + h * w]
        maps.append(chunk.transpose(1, 2).reshape(flat.shape[0], flat.shape[2], h, w))
        start += h * w
    return maps


def make_valid(num_images: int = NUM_IMAGES) -> Tensor:
    """(B, N) bool: location 2 of image 1 is padding."""
    valid = torch.ones(num_images, NUM_LOCATIONS, dtype=torch.bool)
    valid[1 % num_images, 2] = False
    return valid


@dataclass
class Side:
    """Leaf tensors of one network, flattened: cls (B, N, C), reg (B, N, 4, R+1), feat (B, N, F);
    valid (B, N) bool is not a leaf."""

    cls: Tensor
    reg: Tensor
    feat: Tensor
    valid: Tensor

    def leaves(self) -> list[Tensor]:
        return [self.cls, self.reg, self.feat]

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec("dense", self.cls.shape[-1], tuple(LEVEL_STRIDES), self.feat.shape[-1], self.reg.shape[-1])

    def inputs(self, matches: Matches | None = None) -> DistillInputs:
        points, strides = grid()
        outputs = dense_outputs(unflatten(self.cls), unflatten(self.reg.flatten(2)), points, strides, LEVEL_SIZES, None)
        outputs.valid = self.valid.clone()
        image_sizes = torch.tensor([IMAGE_HW] * self.cls.shape[0])
        return DistillInputs(self.spec, outputs, unflatten(self.feat), matches, image_sizes)


def make_side(seed: int, scale: float = 1.0, num_images: int = NUM_IMAGES, reg_max: int = REG_MAX,
              num_classes: int = NUM_CLASSES, channels: int = CHANNELS, dtype=torch.float32) -> Side:
    g = torch.Generator().manual_seed(seed)
    shapes = [(num_images, NUM_LOCATIONS, num_classes), (num_images, NUM_LOCATIONS, 4, reg_max + 1),
              (num_images, NUM_LOCATIONS, channels)]
    return Side(*[(torch.randn(s, generator=g) * scale).to(dtype).requires_grad_() for s in shapes], make_valid(num_images))


def copy_side(side: Side, dtype=None) -> Side:
    return Side(*[t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in side.leaves()], side.valid.clone())


def make_matches(num_images: int = NUM_IMAGES) -> Matches:
    """Positives: image 0 at locations 0, 3 (level 0) and 4 (level 1); image 1 at 1 and 5; location 2
    of image 1 is padding (make_valid). Quality weights differ per positive so weighting matters."""
    pos = torch.zeros(num_images, NUM_LOCATIONS, dtype=torch.bool)
    pos[0, [0, 3, 4]] = True
    pos[1 % num_images, [1, 5]] = True
    quality = torch.linspace(0.2, 0.9, num_images * NUM_LOCATIONS).reshape(num_images, NUM_LOCATIONS) * pos
    pred_index = [row.nonzero(as_tuple=True)[0] for row in pos]
    return Matches(
        pred_index=pred_index,
        gt_index=[torch.zeros(len(i), dtype=torch.long) for i in pred_index],
        weight=[quality[b, i] for b, i in enumerate(pred_index)],
        extras={"pos_thresholds": [torch.tensor([0.3]) for _ in range(num_images)]},
    )


def make_targets(num_images: int = NUM_IMAGES) -> list[Target]:
    return [Target(boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0]]), labels=torch.tensor([0])) for _ in range(num_images)]


def make_loss(name: str, **kwargs) -> DistillLoss:
    """``create_loss`` on the dense ``main`` pairer (the default of kd, ld and feature; box defaults to the
    matched ``gt_bridged`` and is put on the same dense pairs here so every loss sees the same rows)."""
    return create_loss(name, **{"pairer": "main", **kwargs})


def pairs_of(loss: DistillLoss, student: DistillInputs, teacher: DistillInputs, mask: Tensor | None = None) -> Pairs:
    """The loss's own pairer on this batch, or the dense pairs of an explicit (B, N) mask."""
    if mask is not None:
        return Pairs.from_mask(mask, loss.space)
    return loss.pairer(student, teacher, make_targets(student.predictions.num_images), loss.space)


def run(loss: DistillLoss, student: Side, teacher: Side, matches: Matches | None = None,
        mask: Tensor | None = None) -> Tensor:
    matches = matches or make_matches(student.cls.shape[0])
    loss.check_pair(student.spec, teacher.spec)  # as the engine does before any batch
    s_in, t_in = student.inputs(matches), teacher.inputs()
    return loss(s_in, t_in, pairs_of(loss, s_in, t_in, mask))


def duplicate(side: Side) -> Side:
    return Side(*[torch.cat([t, t]).detach().requires_grad_() for t in side.leaves()], torch.cat([side.valid, side.valid]))


def duplicate_matches(m: Matches) -> Matches:
    return Matches(
        pred_index=m.pred_index + m.pred_index,
        gt_index=m.gt_index + m.gt_index,
        weight=m.weight + m.weight,
        extras={k: v + v for k, v in m.extras.items()},
    )


ALL_LOSSES = list_losses()


# --- registry ---------------------------------------------------------------------------------


def test_builtin_losses_are_registered():
    assert {"kd", "ld", "feature"} <= set(ALL_LOSSES)
    assert list_losses("k*") == ["kd"]


def test_unknown_loss_name_is_a_config_error():
    with pytest.raises(ConfigError, match="'nope'.*available: .*kd"):
        create_loss("nope")


def test_unknown_kwarg_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="'kd' has no parameter 'tau'"):
        create_loss("kd", tau=2.0)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("kd", {"temperature": 0}, "temperature"),
        ("kd", {"mode": "hinge"}, "mode"),
        ("kd", {"weight": -1.0}, "weight"),
        ("kd", {"region": "nowhere"}, "'nowhere'"),
        ("ld", {"resample_bins": "cubic"}, "resample_bins"),
        ("ld", {"region": "vlr", "weight_by_quality": True}, "weight_by_quality"),
        ("ld", {"region": "vlr", "region_params": {"gama": 0.1}}, "'gama'"),
        ("ld", {"region": "vlr", "region_params": {"gamma": 2.0}}, "gamma"),
        ("feature", {"level_indices": []}, "level_indices"),
        ("feature", {"student_channels": 0, "teacher_channels": 4}, "student_channels"),
    ],
)
def test_bad_parameter_values_are_config_errors(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_loss(name, **kwargs)


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):

        @register_loss
        class Again(DistillLoss):
            name = "kd"
            needs = frozenset({"head"})


# --- contract, every registered loss ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_needs_names_teacher_parts(name):
    needs = create_loss(name).needs
    assert needs and needs <= {"features", "head"}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_zero_when_student_equals_teacher_and_positive_otherwise(name):
    loss = create_loss(name)
    student = make_side(0)
    assert run(loss, student, copy_side(student)).item() == 0.0
    assert run(loss, student, make_side(1)).item() > 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_reach_only_the_student(name):
    loss = create_loss(name)
    student, teacher = make_side(0), make_side(1)
    value = run(loss, student, teacher)
    value.backward()
    assert all(t.grad is None for t in teacher.leaves())
    grads = [t.grad for t in student.leaves() if t.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_weight_multiplies_the_value(name):
    student, teacher = make_side(0), make_side(1)
    one = run(create_loss(name), student, teacher)
    three = run(create_loss(name, weight=3.0), student, teacher)
    torch.testing.assert_close(three, 3 * one)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_finite_with_large_logits(name):
    loss = create_loss(name)
    student = make_side(0)
    signs = [torch.sign(t.detach()) for t in student.leaves()]
    student = Side(*[(1e4 * s).requires_grad_() for s in signs])
    teacher = Side(*[(-1e4 * s).requires_grad_() for s in signs])
    value = run(loss, student, teacher)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert all(torch.isfinite(t.grad).all() for t in student.leaves() if t.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_low_precision_inputs_are_computed_in_fp32(name, dtype):
    loss = create_loss(name)
    student, teacher = copy_side(make_side(0), dtype), copy_side(make_side(1), dtype)
    value = run(loss, student, teacher)
    reference = run(loss, copy_side(student, torch.float32), copy_side(teacher, torch.float32))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the math to bf16
        under_autocast = run(loss, student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_mask_gives_exact_zero_with_connected_graph(name):
    loss = create_loss(name)
    student, teacher = make_side(0), make_side(1)
    value = run(loss, student, teacher, mask=torch.zeros(NUM_IMAGES, NUM_LOCATIONS))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()  # the graph reaches the student, with zero gradient
    grads = [t.grad for t in student.leaves() if t.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_ground_truth_batch_gives_zero(name):
    loss = create_loss(name)
    assignment = make_assignment()
    assignment.pos_mask[:] = False
    assignment.quality_weight[:] = 0
    assert run(loss, make_side(0), make_side(1), assignment).item() == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_duplicated_batch_gives_the_same_value(name):
    loss = create_loss(name)
    student, teacher, assignment = make_side(0), make_side(1), make_assignment()
    once = run(loss, student, teacher, assignment)
    twice = run(loss, duplicate(student), duplicate(teacher), duplicate_assignment(assignment))
    torch.testing.assert_close(twice, once)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_legacy_normalisation_scaling_with_batch_duplication(name):
    loss = create_loss(name, legacy=True)
    student, teacher, assignment = make_side(0), make_side(1), make_assignment()
    once = run(loss, student, teacher, assignment)
    twice = run(loss, duplicate(student), duplicate(teacher), duplicate_assignment(assignment))
    # LD's reference divides a sum by a constant (grows with images, HikariTJU/LD#78); the others
    # normalise per level by counts, which duplication does not change.
    factor = 2.0 if type(loss).legacy_sums_over_batch else 1.0
    torch.testing.assert_close(twice, factor * once)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_mask_of_wrong_shape_is_rejected(name):
    with pytest.raises(ValueError, match="mask has shape"):
        run(create_loss(name), make_side(0), make_side(1), mask=torch.ones(NUM_IMAGES, NUM_LOCATIONS + 1))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_teacher_on_another_grid_is_a_config_error(name):
    loss = create_loss(name)
    teacher = make_side(1).inputs()
    if teacher.outputs is not None:
        teacher.outputs.level_sizes = [(1, 4), (1, 2)]
    teacher.features = [f.reshape(f.shape[0], f.shape[1], 1, -1) for f in teacher.features]  # (1, 4), (1, 2)
    with pytest.raises(ConfigError, match="same strides and input size"):
        loss(make_side(0).inputs(make_assignment()), teacher, region_mask(loss, make_assignment()))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_missing_teacher_part_is_reported(name):
    loss = create_loss(name)
    student = make_side(0)
    empty_teacher = DistillInputs()
    with pytest.raises(ValueError, match="is None"):
        loss(student.inputs(make_assignment()), empty_teacher, region_mask(loss, make_assignment()))


# --- kd ---------------------------------------------------------------------------------------


def test_kd_softmax_is_zero_for_one_class_and_warns():
    loss = create_loss("kd", mode="softmax")
    student, teacher = make_side(0, num_classes=1), make_side(1, num_classes=1)
    with pytest.warns(UserWarning, match="identically 0"):
        assert run(loss, student, teacher).item() == 0.0
    assert run(create_loss("kd", mode="bce"), student, teacher).item() > 0


def test_kd_class_count_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="3 classes, teacher 4"):
        run(create_loss("kd"), make_side(0), make_side(1, num_classes=4))


# --- ld ---------------------------------------------------------------------------------------


def test_ld_refuses_different_reg_max_without_resampling():
    with pytest.raises(ConfigError, match="reg_max 7 != student reg_max 4.*resample_bins"):
        run(create_loss("ld"), make_side(0), make_side(1, reg_max=7))


@pytest.mark.parametrize("mode", ["distance", "scale", True])
def test_ld_resamples_teacher_bins(mode):
    student, teacher = make_side(0), make_side(1, reg_max=7)
    value = run(create_loss("ld", resample_bins=mode), student, teacher)
    value.backward()
    assert torch.isfinite(value) and value > 0 and teacher.reg.grad is None


def test_ld_quality_weighting_follows_the_region():
    main, vlr = create_loss("ld"), create_loss("ld", region="vlr")
    assert main.weight_by_quality and main.legacy_avg_factor == 4.0
    assert not vlr.weight_by_quality and vlr.legacy_avg_factor == 16.0
    # Only the relative quality weights matter in the normalised mode: one positive re-weighted moves it.
    student, teacher, assignment = make_side(0), make_side(1), make_assignment()
    base = run(main, student, teacher, assignment)
    assignment.quality_weight[0, 0] *= 5
    assert not torch.isclose(run(main, student, teacher, assignment), base)


# --- feature ----------------------------------------------------------------------------------


def test_feature_adapter_maps_channels_and_trains():
    loss = create_loss("feature", student_channels=3, teacher_channels=CHANNELS)
    assert sum(p.numel() for p in loss.parameters()) == 3 * CHANNELS + CHANNELS  # 1x1 conv weight + bias
    student, teacher = make_side(0, channels=3), make_side(1)
    value = run(loss, student, teacher)
    value.backward()
    assert loss.adapter.weight.grad is not None and loss.adapter.weight.grad.abs().sum() > 0
    assert student.feat.grad.abs().sum() > 0 and teacher.feat.grad is None
    assert list(create_loss("feature", student_channels=4, teacher_channels=4).parameters()) == []


def test_feature_channel_mismatch_without_adapter_is_a_config_error():
    with pytest.raises(ConfigError, match="student_channels: 3 and teacher_channels: 5"):
        run(create_loss("feature"), make_side(0, channels=3), make_side(1))


def test_feature_level_indices_select_levels():
    student = make_side(0)
    teacher = copy_side(student)
    with torch.no_grad():
        teacher.feat[:, :4] += 1.0  # differ on level 0 (locations 0-3) only
    assert run(create_loss("feature", level_indices=[1]), student, teacher).item() == 0.0
    assert run(create_loss("feature", level_indices=[0]), student, teacher).item() > 0.0
    with pytest.raises(ConfigError, match="out of range"):
        run(create_loss("feature", level_indices=[2]), student, teacher)


def test_region_is_bound_and_hashable():
    loss = create_loss("ld", region="vlr", region_params={"gamma": 0.5, "metric": "diou_iof_legacy"})
    same = create_loss("kd", region="vlr", region_params={"metric": "diou_iof_legacy", "gamma": 0.5})
    assert loss.region == same.region and len({loss.region, same.region}) == 1
    assert str(loss.region) == "vlr(gamma=0.5, metric='diou_iof_legacy')"


def test_feature_rows_of_a_full_selection_match_the_gather_in_order():
    feature = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, H, W)
    inputs = DistillInputs(features=[feature])
    full = inputs.feature_rows(0, torch.ones(2, 4, dtype=torch.bool))
    expected = feature.flatten(2).transpose(1, 2).reshape(8, 3)  # batch-major, row-major locations
    assert torch.equal(full, expected)
    assert full[5].tolist() == [13.0, 17.0, 21.0]  # image 1, location 1: channels c * 4 + 1 + 12
    partial = inputs.feature_rows(0, torch.tensor([[False, True, False, False], [False, True, False, False]]))
    assert torch.equal(partial, expected[[1, 5]])
