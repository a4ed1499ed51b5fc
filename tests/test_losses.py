"""Contract tests for every registered distillation loss, plus the registry and loss-specific options.

A tiny two-level dense output (2x2 at stride 8, 1x2 at stride 16: N = 6 locations), B = 2 images,
3 classes, reg_max 4 and 5-channel features is enough to exercise gathering, weighting and reduction.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tolerances import FP32_FEW_OPS, FP64_SAME_MATH, fp32_sum
from torch import Tensor

from distill.engine.device import Runtime
from distill.errors import ConfigError
from distill.losses import DistillInputs, DistillLoss, create_loss, list_losses, loss_parameters, register_loss
from distill.pairers import RegionPairer, create_pairer, list_pairers
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


def prepare(loss: DistillLoss, student: Side, teacher: Side, matches: Matches | None = None,
            mask: Tensor | None = None) -> tuple[DistillInputs, DistillInputs, Pairs]:
    """Check the pair (as the engine does before any batch), build both sides and the pairs."""
    matches = matches or make_matches(student.cls.shape[0])
    loss.check_pair(student.spec, teacher.spec)
    s_in, t_in = student.inputs(matches), teacher.inputs()
    return s_in, t_in, pairs_of(loss, s_in, t_in, mask)


def run(loss: DistillLoss, student: Side, teacher: Side, matches: Matches | None = None,
        mask: Tensor | None = None) -> Tensor:
    return loss(*prepare(loss, student, teacher, matches, mask))


def duplicate(side: Side) -> Side:
    return Side(*[torch.cat([t, t]).detach().requires_grad_() for t in side.leaves()], torch.cat([side.valid, side.valid]))


def duplicate_matches(m: Matches) -> Matches:
    return Matches(
        pred_index=m.pred_index + m.pred_index,
        gt_index=m.gt_index + m.gt_index,
        weight=m.weight + m.weight,
        extras={k: v + v for k, v in m.extras.items()},
    )


# Losses that finish the teacher's head on the student's maps (crosskd) or its decoder on the student's
# queries (crosskd_query) need real heads, not the synthetic sides here: tests/test_crosskd.py and
# tests/test_crosskd_query.py run them on GFL and query-detector modules.
ALL_LOSSES = [n for n in list_losses() if not {"head_tail", "decoder_tail"} & create_loss(n).needs]
LEGACY_LOSSES = [n for n in ALL_LOSSES if "legacy" in loss_parameters(n)]


# --- registry ---------------------------------------------------------------------------------


def test_builtin_losses_are_registered():
    assert {"kd", "ld", "feature", "box"} <= set(ALL_LOSSES)
    assert list_losses("k*") == ["kd"]
    assert {"kd", "ld", "feature"} <= set(LEGACY_LOSSES)


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
        ("kd", {"pairer": "nowhere"}, "'nowhere'"),
        ("ld", {"resample_bins": "cubic"}, "resample_bins"),
        ("ld", {"pairer": "vlr", "weight_by_quality": True}, "weight_by_quality"),
        ("ld", {"pairer": "vlr", "pairer_params": {"gama": 0.1}}, "'gama'"),
        ("ld", {"pairer": "vlr", "pairer_params": {"gamma": 2.0}}, "gamma"),
        ("feature", {"level_indices": []}, "level_indices"),
        ("feature", {"student_channels": 0, "teacher_channels": 4}, "student_channels"),
        ("box", {"l1_weight": -1.0}, "l1_weight"),
        ("box", {"giou_weight": float("nan")}, "giou_weight"),
        ("box", {"pairer": "teacher_set", "pairer_params": {"top_k": 0}}, "top_k"),
        ("box", {"pairer": "gt_bridged", "pairer_params": {"top_k": 5}}, "'top_k'"),
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
    loss = create_loss(name)
    needs = loss.needs
    assert needs and needs <= {"features", "head"}
    assert loss.space == ("features" if "features" in needs else "predictions")


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_zero_when_student_equals_teacher_and_positive_otherwise(name):
    loss = make_loss(name)
    student = make_side(0)
    assert run(loss, student, copy_side(student)).item() == 0.0
    assert run(loss, student, make_side(1)).item() > 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_reach_only_the_student(name):
    loss = make_loss(name)
    student, teacher = make_side(0), make_side(1)
    value = run(loss, student, teacher)
    value.backward()
    assert all(t.grad is None for t in teacher.leaves())
    grads = [t.grad for t in student.leaves() if t.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_weight_multiplies_the_value(name):
    student, teacher = make_side(0), make_side(1)
    one = run(make_loss(name), student, teacher)
    three = run(make_loss(name, weight=3.0), student, teacher)
    # the same ops on the same rows; the weight costs one rounding more on either side: assert_close's
    # default rtol 1.3e-6 ≈ 22 · 2^-24 is > 10x
    torch.testing.assert_close(three, 3 * one)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_finite_with_large_logits(name):
    loss = make_loss(name)
    student = make_side(0)
    signs = [torch.sign(t.detach()) for t in student.leaves()]
    student = Side(*[(1e4 * s).requires_grad_() for s in signs], make_valid())
    teacher = Side(*[(-1e4 * s).requires_grad_() for s in signs], make_valid())
    value = run(loss, student, teacher)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert all(torch.isfinite(t.grad).all() for t in student.leaves() if t.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_low_precision_inputs_are_computed_in_fp32(name, dtype):
    loss = make_loss(name)
    student, teacher = copy_side(make_side(0), dtype), copy_side(make_side(1), dtype)
    value = run(loss, student, teacher)
    reference = run(loss, copy_side(student, torch.float32), copy_side(teacher, torch.float32))
    assert value.dtype == torch.float32
    # upcast first, then the same fp32 ops on the same shapes in this process: the same bits
    torch.testing.assert_close(value, reference, rtol=0, atol=0)
    # The sides are built outside autocast: torch's CPU autocast refuses to concatenate fp16 maps under
    # a bf16 context (dense_outputs concatenates the levels), which no real head produces.
    s_in, t_in, pairs = prepare(loss, student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the math to bf16
        under_autocast = loss(s_in, t_in, pairs)
        if dtype == torch.bfloat16:  # maps of the context's own dtype: the whole step under autocast
            in_context = run(loss, student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)
    if dtype == torch.bfloat16:
        assert in_context.dtype == torch.float32
        torch.testing.assert_close(in_context, reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_mask_gives_exact_zero_with_connected_graph(name):
    loss = make_loss(name)
    student, teacher = make_side(0), make_side(1)
    value = run(loss, student, teacher, mask=torch.zeros(NUM_IMAGES, NUM_LOCATIONS))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()  # the graph reaches the student, with zero gradient
    grads = [t.grad for t in student.leaves() if t.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_pairs_give_exact_zero_with_connected_graph(name):
    # the same through Pairs.empty, as a matched pairer returns when nothing is matched
    loss = make_loss(name)
    student, teacher = make_side(0), make_side(1)
    s_in, t_in = student.inputs(make_matches()), teacher.inputs()
    value = loss(s_in, t_in, Pairs.empty(NUM_IMAGES, "cpu", loss.space))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    grads = [t.grad for t in student.leaves() if t.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_ground_truth_batch_gives_zero(name):
    loss = make_loss(name)
    empty = torch.zeros(0, dtype=torch.long)
    matches = Matches([empty] * NUM_IMAGES, [empty] * NUM_IMAGES, [torch.zeros(0)] * NUM_IMAGES,
                      {"pos_thresholds": [torch.zeros(0)] * NUM_IMAGES})
    assert run(loss, make_side(0), make_side(1), matches).item() == 0.0


# Duplicating the batch is the same math, proven in fp64 (FP64_SAME_MATH). In fp32 the rows are the same
# values through the same per-row ops; only the final sums over ≤ 2 · 2 · 6 · 4 · 5 = 240 nonnegative
# terms reorder (and a normaliser is a second such sum): fp32_sum(240, condition=2) ≈ 9.5e-6.
DUPLICATION_TOL = {"float64": FP64_SAME_MATH, "float32": fp32_sum(240, condition=2)}


@pytest.mark.parametrize("dtype", sorted(DUPLICATION_TOL))
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_duplicated_batch_gives_the_same_value(name, dtype):
    with Runtime(dtype=dtype).precision():
        loss = make_loss(name).to(torch.get_default_dtype())
        student, teacher, matches = make_side(0, dtype=getattr(torch, dtype)), make_side(1, dtype=getattr(torch, dtype)), make_matches()
        once = run(loss, student, teacher, matches)
        twice = run(loss, duplicate(student), duplicate(teacher), duplicate_matches(matches))
    assert once.dtype == getattr(torch, dtype)
    torch.testing.assert_close(twice, once, rtol=DUPLICATION_TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", sorted(DUPLICATION_TOL))
@pytest.mark.parametrize("name", LEGACY_LOSSES)
def test_legacy_normalisation_scaling_with_batch_duplication(name, dtype):
    with Runtime(dtype=dtype).precision():
        loss = make_loss(name, legacy=True).to(torch.get_default_dtype())
        student, teacher, matches = make_side(0, dtype=getattr(torch, dtype)), make_side(1, dtype=getattr(torch, dtype)), make_matches()
        once = run(loss, student, teacher, matches)
        twice = run(loss, duplicate(student), duplicate(teacher), duplicate_matches(matches))
    # LD's reference divides a sum by a constant (grows with images, HikariTJU/LD#78); the others
    # normalise per level by counts, which duplication does not change.
    factor = 2.0 if type(loss).legacy_sums_over_batch else 1.0
    torch.testing.assert_close(twice, factor * once, rtol=DUPLICATION_TOL[dtype], atol=0)  # as above


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_teacher_at_other_strides_is_a_config_error(name):
    # A dense pairer compares the same location on both sides: a teacher predicting at / with FPN maps
    # at other strides is refused by the pair check, before any batch.
    loss = make_loss(name)
    student = make_side(0)
    loss.check_pair(student.spec, student.spec)  # the same detector fits
    other = DetectorSpec("dense", NUM_CLASSES, (8, 32), CHANNELS, REG_MAX + 1)
    # feature losses pair levels by stride (a teacher may have more levels), so they name the missing stride
    match = r"no FPN map at student stride\(s\) \[16\]" if loss.space == "features" else r"teacher strides \(8, 32\) != student strides \(8, 16\).*same FPN levels"
    with pytest.raises(ConfigError, match=match):
        loss.check_pair(student.spec, other)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_teacher_on_another_grid_is_a_config_error(name):
    # Same strides, another input size: the teacher's grid is (1, 4), (1, 2) where the student's is
    # (2, 2), (1, 2) — as many locations, at other places. The spec cannot tell (no input size), so the
    # grids are compared when the maps meet (pairer or loss), as the dense pairer documents.
    loss = make_loss(name)
    student, teacher = make_side(0), make_side(1)
    loss.check_pair(student.spec, teacher.spec)
    sizes = [(1, 4), (1, 2)]
    points, strides = grid(sizes)
    t_out = dense_outputs(unflatten(teacher.cls, sizes), unflatten(teacher.reg.flatten(2), sizes), points, strides, sizes, None)
    t_in = DistillInputs(teacher.spec, t_out, unflatten(teacher.feat, sizes), None, torch.tensor([(8, 64)] * NUM_IMAGES))
    s_in = student.inputs(make_matches())
    with pytest.raises(ConfigError, match="same strides and input size"):
        loss(s_in, t_in, pairs_of(loss, s_in, t_in))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_prediction_pairs_need_dense_detectors(name):
    # the dense pairer on a sparse side: a prediction loss is refused, a feature loss on gt_boxes is not
    loss = make_loss(name)
    dense = make_side(0).spec
    sparse = DetectorSpec("sparse", NUM_CLASSES, tuple(LEVEL_STRIDES), CHANNELS, REG_MAX + 1)
    if loss.space == "predictions":
        with pytest.raises(ConfigError, match="teacher is a sparse detector"):
            loss.check_pair(dense, sparse)
    else:
        make_loss(name, pairer="gt_boxes").check_pair(sparse, dense)
        with pytest.raises(ConfigError, match="student is a sparse detector"):
            loss.check_pair(sparse, dense)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_missing_teacher_part_is_reported(name):
    loss = make_loss(name)
    student = make_side(0)
    empty_teacher = DistillInputs()
    s_in = student.inputs(make_matches())
    with pytest.raises(ValueError, match="is None"):
        loss(s_in, empty_teacher, pairs_of(loss, s_in, empty_teacher))


# --- kd ---------------------------------------------------------------------------------------


def test_kd_softmax_is_zero_for_one_class_and_warns():
    loss = create_loss("kd", mode="softmax")
    student, teacher = make_side(0, num_classes=1), make_side(1, num_classes=1)
    with pytest.warns(UserWarning, match="identically 0"):
        assert run(loss, student, teacher).item() == 0.0
    assert run(create_loss("kd", mode="bce"), student, teacher).item() > 0


def test_kd_class_count_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="3 classes, teacher 4"):
        create_loss("kd").check_pair(make_side(0).spec, make_side(1, num_classes=4).spec)


# --- ld ---------------------------------------------------------------------------------------


def test_ld_refuses_different_reg_max_without_resampling():
    with pytest.raises(ConfigError, match="reg_max 7 != student reg_max 4.*resample_bins"):
        create_loss("ld").check_pair(make_side(0).spec, make_side(1, reg_max=7).spec)


@pytest.mark.parametrize("mode", ["distance", "scale", True])
def test_ld_resamples_teacher_bins(mode):
    student, teacher = make_side(0), make_side(1, reg_max=7)
    value = run(create_loss("ld", resample_bins=mode), student, teacher)  # run checks the pair first
    value.backward()
    assert torch.isfinite(value) and value > 0 and teacher.reg.grad is None


@pytest.mark.parametrize("name", [n for n in list_pairers() if create_pairer(n).only_for is None])  # crossed_queries: crosskd_query's own
def test_ld_defaults_are_the_pairers_own_attributes(name):
    pairer = create_pairer(name)
    expected = {"main": (True, 4.0), "vlr": (False, 16.0)}.get(name, (False, 4.0))  # the LD reference's constants
    assert (pairer.on_student_positives, pairer.ld_reference_avg_factor) == expected
    loss = create_loss("ld", pairer=name)
    assert (loss.weight_by_quality, loss.legacy_avg_factor) == expected
    if not expected[0]:
        with pytest.raises(ConfigError, match="weight_by_quality needs pairer 'main'"):
            create_loss("ld", pairer=name, weight_by_quality=True)


def test_ld_quality_weighting_follows_the_region():
    main, vlr = create_loss("ld"), create_loss("ld", pairer="vlr")
    assert main.weight_by_quality and main.legacy_avg_factor == 4.0
    assert not vlr.weight_by_quality and vlr.legacy_avg_factor == 16.0
    # Only the relative quality weights matter in the normalised mode: one positive re-weighted moves it.
    student, teacher, matches = make_side(0), make_side(1), make_matches()
    base = run(main, student, teacher, matches)
    assert matches.pred_index[0][0] == 0
    matches.weight[0][0] *= 5  # image 0, location 0
    assert not torch.isclose(run(main, student, teacher, matches), base)


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
        create_loss("feature").check_pair(make_side(0, channels=3).spec, make_side(1).spec)


def test_feature_level_indices_select_levels():
    student = make_side(0)
    teacher = copy_side(student)
    with torch.no_grad():
        teacher.feat[:, :4] += 1.0  # differ on level 0 (locations 0-3) only
    assert run(create_loss("feature", level_indices=[1]), student, teacher).item() == 0.0
    assert run(create_loss("feature", level_indices=[0]), student, teacher).item() > 0.0
    with pytest.raises(ConfigError, match="out of range"):
        run(create_loss("feature", level_indices=[2]), student, teacher)


def teacher_with_levels(side: Side, strides: tuple[int, ...], extra: dict[int, Tensor]) -> DistillInputs:
    """``side`` as a teacher whose FPN has the levels ``strides``: its own two maps at strides 8 and 16,
    and the maps ``extra`` (level index -> (B, C, H, W)) inserted at the other levels."""
    t_in = side.inputs()
    own = iter(t_in.features)
    t_in.features = [extra[i] if i in extra else next(own) for i in range(len(strides))]
    t_in.spec = DetectorSpec("dense", NUM_CLASSES, strides, CHANNELS, REG_MAX + 1)
    return t_in


@pytest.mark.parametrize("strides, extra_level, extra_hw", [((8, 16, 32), 2, (1, 1)), ((4, 8, 16), 0, (4, 4))])
def test_feature_pairs_levels_by_stride_with_a_teacher_of_more_levels(strides, extra_level, extra_hw):
    # A P3-P4 student against a teacher with one more level, coarser (P3-P5) or finer (P2-P4): the
    # student's level l meets the teacher's level of the same stride; the extra level is never read.
    student = make_side(0)
    loss = create_loss("feature", pairer="all", relative=False)
    extra = {extra_level: torch.full((NUM_IMAGES, CHANNELS, *extra_hw), 100.0)}
    t_in = teacher_with_levels(copy_side(student), strides, extra)
    loss.check_pair(student.spec, t_in.spec)
    s_in = student.inputs(make_matches())
    pairs = loss.pairer(s_in, t_in, make_targets(), loss.space)
    assert loss(s_in, t_in, pairs).item() == 0.0
    # the teacher's stride-16 map one higher in every channel: squared error C = 5 on the 2 + 2
    # stride-16 rows, 0 on the rest; 11 valid locations (location 2 of image 1 is padding) x 5
    # channels -> 4 * 5 / (11 * 5) = 4 / 11
    shifted = copy_side(student)
    with torch.no_grad():
        shifted.feat[:, 4:] += 1.0
    t_in = teacher_with_levels(shifted, strides, extra)
    assert loss(s_in, t_in, loss.pairer(s_in, t_in, make_targets(), loss.space)).item() == pytest.approx(4 / 11, rel=FP32_FEW_OPS)
    # masked pairs (gt_boxes gathers rows) read the same teacher level
    inside = create_loss("feature", pairer="gt_boxes", relative=False)
    value = inside(s_in, t_in, inside.pairer(s_in, t_in, make_targets(), inside.space)).item()
    # inside the 20x20 GT: the 4 stride-8 centres and the stride-16 centre (8, 8), not (24, 8);
    # 9 valid rows, 2 of them stride-16 with error 5 -> 2 * 5 / (9 * 5) = 2 / 9
    # (f + 1) - f is 1 up to a rounding of |f| ≤ ~4, then squares and sums of ≤ 20 terms: ≤ 16 roundings
    assert value == pytest.approx(2 / 9, rel=FP32_FEW_OPS)


def test_prediction_losses_still_need_the_same_strides():
    more = DetectorSpec("dense", NUM_CLASSES, (8, 16, 32), CHANNELS, REG_MAX + 1)
    create_loss("feature", pairer="all").check_pair(make_side(0).spec, more)
    with pytest.raises(ConfigError, match=r"teacher strides \(8, 16, 32\) != student strides \(8, 16\)"):
        create_loss("kd", pairer="all").check_pair(make_side(0).spec, more)


def test_region_is_bound_and_hashable():
    loss = create_loss("ld", pairer="vlr", pairer_params={"gamma": 0.5, "metric": "diou_iof_legacy"})
    same = create_loss("kd", pairer="vlr", pairer_params={"metric": "diou_iof_legacy", "gamma": 0.5})
    assert isinstance(loss.pairer, RegionPairer)
    assert loss.pairer == same.pairer and len({loss.pairer, same.pairer}) == 1
    assert str(loss.pairer) == "vlr(gamma=0.5, metric='diou_iof_legacy')"


def test_feature_rows_of_a_full_selection_match_the_gather_in_order():
    feature = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, H, W)
    inputs = DistillInputs(features=[feature])
    full = inputs.feature_rows(0, None, None)
    expected = feature.flatten(2).transpose(1, 2).reshape(8, 3)  # batch-major, row-major locations
    assert torch.equal(full, expected)
    assert full[5].tolist() == [13.0, 17.0, 21.0]  # image 1, location 1: channels c * 4 + 1 + 12
    gathered = inputs.feature_rows(0, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 3] * 2))
    assert torch.equal(gathered, expected)
    partial = inputs.feature_rows(0, torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert torch.equal(partial, expected[[1, 5]])


# --- box --------------------------------------------------------------------------------------


def test_box_defaults_to_the_gt_bridged_pairer():
    loss = create_loss("box")
    assert loss.pairer.name == "gt_bridged" and loss.space == "predictions" and loss.needs == {"head"}
    assert (loss.l1_weight, loss.giou_weight) == (5.0, 2.0)


def test_box_reads_only_the_boxes():
    # Same boxes (reg logits), other class logits and features: zero; another box: positive.
    loss = make_loss("box")
    student = make_side(0)
    other = make_side(1)
    teacher = Side(other.cls, student.reg.detach().clone().requires_grad_(), other.feat, student.valid)
    assert run(loss, student, teacher).item() == 0.0
    value = run(loss, student, make_side(1))
    value.backward()
    assert student.reg.grad.abs().sum() > 0 and student.cls.grad is None and student.feat.grad is None


def test_box_on_gt_bridged_pairs_of_dense_detectors():
    # Default pairer: each student positive of GT g meets the teacher's positive of g whose box fits g
    # best. Both sides are dense here and share the positives; rows are read with each side's own index.
    loss = create_loss("box")
    student, teacher, matches = make_side(0), make_side(1), make_matches()
    loss.check_pair(student.spec, teacher.spec)
    s_in, t_in = student.inputs(matches), teacher.inputs(make_matches())
    pairs = loss.pairer(s_in, t_in, make_targets(), loss.space)
    assert len(pairs) == 5 and torch.equal(pairs.student, torch.cat(matches.pred_index))
    assert all(set(pairs.teacher[pairs.image == b].tolist()) <= set(matches.pred_index[b].tolist()) for b in range(2))
    value = loss(s_in, t_in, pairs)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert teacher.reg.grad is None and student.reg.grad.abs().sum() > 0
    # the value by hand, in fp64, on the rows the pairs name (each side read with its own index):
    # weighted mean of 5 * L1 on boxes / (w, h, w, h) + 2 * (1 - GIoU), GIoU from its definition
    s = s_in.box_rows(pairs.image, pairs.student).detach().double()
    t = t_in.box_rows(pairs.image, pairs.teacher).detach().double()
    hw = s_in.image_sizes.double()[pairs.image]
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    inter = (torch.minimum(s[:, 2], t[:, 2]) - torch.maximum(s[:, 0], t[:, 0])).clamp(min=0) * \
        (torch.minimum(s[:, 3], t[:, 3]) - torch.maximum(s[:, 1], t[:, 1])).clamp(min=0)
    union = area(s) + area(t) - inter
    hull = (torch.maximum(s[:, 2], t[:, 2]) - torch.minimum(s[:, 0], t[:, 0])) * (torch.maximum(s[:, 3], t[:, 3]) - torch.minimum(s[:, 1], t[:, 1]))
    giou = inter / union - (hull - union) / hull
    w = pairs.weight.double()
    expected = (w * (5 * ((s - t).abs() / scale).sum(-1) + 2 * (1 - giou))).sum() / w.sum()
    # fp32 loss against the fp64 formula: ~30 fp32 operations per row on values below 1e3 and a 5-row
    # weighted sum, error < 100 u = 6e-6 relative; 2e-5 leaves margin on any CPU
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=0)


def test_box_reads_sparse_predictions_through_pairs():
    # Plain Predictions (a sparse detector's queries): the loss only needs boxes and image sizes.
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]]], requires_grad=True)
    preds = Predictions(torch.zeros(1, 2, 1), boxes, torch.ones(1, 2, dtype=torch.bool))
    teacher = Predictions(torch.zeros(1, 2, 1), boxes.detach().flip(1), torch.ones(1, 2, dtype=torch.bool))
    sizes = torch.tensor([[8, 8]])
    s_in, t_in = DistillInputs(predictions=preds, image_sizes=sizes), DistillInputs(predictions=teacher, image_sizes=sizes)
    crossed = Pairs(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), 1)
    assert create_loss("box")(s_in, t_in, crossed).item() == 0.0  # student 0 = teacher 1 and vice versa
    straight = Pairs(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2), 1)
    assert create_loss("box")(s_in, t_in, straight).item() > 0.0
    with pytest.raises(ValueError, match="image sizes"):
        create_loss("box")(DistillInputs(predictions=preds), t_in, crossed)
