"""Registry behaviour and the detector contract, checked for every registered student (timm style).

The contract tests come in two parts: common ones for every detector (``distill.detector``:
spec, Predictions, Matches, postprocess, config round trip) and family-specific ones (dense: the
location grid and the prediction-free grid assignment; sparse: valid query masks).
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch
import toy_query  # noqa: F401  registers the test-only sparse detector, so the common contract covers a sparse one

from distill.detector import Detector, GridAssigner
from distill.errors import ConfigError
from distill.structures import DenseOutputs, Detections, DetectorSpec, Matches, Predictions, Target
from students import create_student, list_students, register_student
from students.registry import student_entrypoint

TINY = dict(num_classes=3, fpn_channels=16, head_convs=1, pretrained=None)
# Small settings of every registered student that is not a GFL preset (a new student adds its own).
_SPARSE_TINY = dict(
    backbone="mobilenetv3_small_050", strides=(8, 16, 32), fpn_channels=16, num_queries=8, ffn_dim=32, dynamic_dim=8,
    num_heads=4, roi_canonical=48.0, pretrained=None,
)
TINY_BY_NAME: dict[str, dict] = {"toy_query": {}, "asag_s": _SPARSE_TINY, "asag_a": {**_SPARSE_TINY, "sampling_points": 8, "mixing_out_points": 16},
                                  "asag_s_gen": _SPARSE_TINY, "sparse_rcnn6": _SPARSE_TINY,
                                  "dab_detr": dict(backbone="mobilenetv3_small_050", strides=(8, 16, 32), hidden_dim=16, num_queries=8,
                                                   ffn_dim=32, num_heads=4, decoder_layers=2, encoder_layers=1, pretrained=None)}


def tiny_kwargs(name: str) -> dict:
    if name.startswith("gfl"):
        return TINY
    if name not in TINY_BY_NAME:
        raise AssertionError(f"student {name!r} has no small test settings: add them to TINY_BY_NAME in tests/test_students.py")
    return {"num_classes": 3, **TINY_BY_NAME[name]}
SIZE = 64
# Pyramid of a 64 x 64 input: strides 8..128 -> 8x8, 4x4, 2x2, 1x1, 1x1 = 64 + 16 + 4 + 1 + 1 locations.
LEVEL_SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
NUM_LOCATIONS = 86


def _targets() -> list[Target]:
    """Image 0 empty, image 1 one GT, image 2 several GTs (input pixels of a 64 x 64 image)."""
    several = Target(
        boxes=torch.tensor([[2.0, 3.0, 30.0, 40.0], [20.0, 20.0, 62.0, 60.0], [40.0, 5.0, 60.0, 20.0]]),
        labels=torch.tensor([0, 2, 1]),
    )
    one = Target(boxes=torch.tensor([[8.0, 8.0, 56.0, 48.0]]), labels=torch.tensor([1]))
    return [Target.empty(), one, several]


@pytest.fixture(scope="module", params=list_students())
def student(request):
    torch.manual_seed(0)
    return create_student(request.param, **tiny_kwargs(request.param))


@pytest.fixture(scope="module", params=[n for n in list_students() if n.startswith("gfl")])
def dense_student(request):
    torch.manual_seed(0)
    return create_student(request.param, **TINY)


# --------------------------------------------------------------------------------------------- registry
def test_registry_lists_gfl_family():
    names = list_students()
    assert {"gfl", "gfl_resnet18", "gfl_mobilenetv2", "gfl_efficientnet_lite0"} <= set(names)
    assert names == sorted(names)
    assert list_students("gfl_*") == [n for n in names if n.startswith("gfl_")]
    assert list_students("*mobilenet*") == ["gfl_mobilenetv2"]
    assert list_students(["gfl", "gfl_res*"]) == ["gfl", "gfl_resnet18"]
    assert list_students("gfl*", exclude_filters=["*mobile*", "*efficient*"]) == ["gfl", "gfl_resnet18"]
    assert list_students("nothing*") == []


def test_unknown_student_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown student 'gfl_resnet19'.*gfl_resnet18"):
        create_student("gfl_resnet19")


def test_unknown_kwarg_names_the_key():
    with pytest.raises(ConfigError, match=r"'gfl_resnet18' has no parameter 'fpn_chanels'"):
        create_student("gfl_resnet18", fpn_chanels=32)


def test_invalid_value_is_a_config_error():
    with pytest.raises(ConfigError, match="fpn_channels"):
        create_student("gfl", fpn_channels=0)
    with pytest.raises(ConfigError, match="'backbone' must be a timm model name .*'not_a_backbone'"):
        create_student("gfl", backbone="not_a_backbone")


def test_preset_sets_defaults_and_kwargs_override():
    signature = inspect.signature(student_entrypoint("gfl_mobilenetv2"))
    assert signature.parameters["backbone"].default == "mobilenetv2_100"
    model = create_student("gfl_resnet18", **{**TINY, "fpn_channels": 24, "dfl_weight": 0.0})
    assert model.fpn_channels == 24 and model.dfl_weight == 0.0
    assert model.config["name"] == "gfl_resnet18"
    assert model.config["params"]["backbone"] == "resnet18"  # preset default recorded
    assert model.config["params"]["fpn_channels"] == 24


def test_config_is_json_and_rebuilds_the_same_model(tmp_path):
    model = create_student("gfl_resnet18", **TINY)
    params = json.loads(json.dumps(model.config))["params"]
    # norm_eval is stored resolved (False for random init), not as the "auto" None.
    assert params["norm_eval"] is False
    rebuilt = create_student(model.config["name"], **params)
    rebuilt.load_state_dict(model.state_dict())  # strict: identical architecture
    assert rebuilt.config == model.config


def test_register_rejects_duplicates_and_variadic_factories():
    with pytest.raises(ValueError, match="already registered"):

        def gfl():  # noqa: F811 - deliberately clashes with the registered name
            return torch.nn.Identity()

        register_student(gfl)
    with pytest.raises(ValueError, match=r"\*\*kwargs"):

        def loose_student(**kwargs):
            return torch.nn.Identity()

        register_student(loose_student)
    assert "loose_student" not in list_students()


# ----------------------------------------------------------------------------------- common contract
def test_spec_and_protocol(student):
    assert isinstance(student, Detector)
    spec = student.spec
    assert isinstance(spec, DetectorSpec) and spec.family == student.family in ("dense", "sparse")
    assert spec.num_classes == 3 and len(spec.strides) >= 1
    assert set(student.config) == {"name", "params"}


def test_predictions_shapes(student):
    student.eval()
    images, sizes = torch.randn(2, 3, SIZE, SIZE), torch.tensor([[SIZE, SIZE], [40, 56]])
    with torch.no_grad():
        out = student.head(student.features(images), sizes)
    assert isinstance(out, Predictions)
    b, p, c = out.logits.shape
    assert (b, c) == (2, 3) and out.boxes.shape == (2, p, 4) and out.valid.shape == (2, p) and out.valid.dtype == torch.bool
    assert out.valid[0].any() and out.valid[1].sum() <= out.valid[0].sum()  # the smaller image has no more
    if student.spec.bins is not None:
        assert out.bins.logits.shape == (2, p, 4, student.spec.bins)
        # boxes are the bins' integral: the same decode on the same tensor in this process, the same bits
        torch.testing.assert_close(out.bins.decode(), out.boxes, rtol=0, atol=0)


def test_loss_and_matches_for_empty_one_and_several_gts(student):
    student.train()
    student.zero_grad()
    sizes = torch.tensor([[SIZE, SIZE]] * 3)
    out = student(torch.randn(3, 3, SIZE, SIZE), sizes)
    losses, matches = student.loss(out, _targets(), sizes)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert isinstance(matches, Matches) and matches.num_images == 3
    for b, target in enumerate(_targets()):
        pred, gt = matches.pred_index[b], matches.gt_index[b]
        assert pred.shape == gt.shape and len(pred) == len(set(pred.tolist()))  # a prediction at most once
        assert bool(out.valid[b, pred].all()) and (gt < max(len(target.boxes), 1)).all()
    assert len(matches.pred_index[0]) == 0 and len(matches.pred_index[1]) > 0
    assert set(matches.gt_index[2].tolist()) == {0, 1, 2}  # every GT of image 2 gets a match
    sum(losses.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_config_round_trip(student):
    rebuilt = create_student(student.config["name"], **student.config["params"])
    assert rebuilt.config == student.config
    assert set(rebuilt.state_dict()) == set(student.state_dict())


# ------------------------------------------------------------------------------------ dense contract
def test_attributes(dense_student):
    assert dense_student.strides == (8, 16, 32, 64, 128)
    assert (dense_student.num_classes, dense_student.reg_max, dense_student.fpn_channels) == (3, 16, 16)
    assert dense_student.spec == DetectorSpec("dense", 3, (8, 16, 32, 64, 128), 16, 17, head_stages=dense_student.dense_head.num_blocks)


def test_head_and_flat_shapes(dense_student):
    images = torch.randn(2, 3, SIZE, SIZE)
    feats = dense_student.features(images)
    assert [tuple(f.shape) for f in feats] == [(2, 16, h, w) for h, w in LEVEL_SIZES]
    out = dense_student.head(feats)
    assert isinstance(out, DenseOutputs)
    assert out.level_sizes == LEVEL_SIZES and out.reg_max == 16
    assert out.points.shape == (NUM_LOCATIONS, 2) and out.strides.shape == (NUM_LOCATIONS,)
    assert out.logits.shape == (2, NUM_LOCATIONS, 3)
    assert out.bin_logits.shape == (2, NUM_LOCATIONS, 4, 17)
    assert bool(out.valid.all())  # no image sizes: every location is inside
    # the flattening is level by level, row-major: location 8 is row 1, col 0 of P3
    cls_p3 = dense_student.dense_head(feats)[0][0]  # (B, C, 8, 8)
    torch.testing.assert_close(out.logits[:, 8], cls_p3[:, :, 1, 0], rtol=0, atol=0)  # the same head on the same maps: the same bits


def test_dense_matches_come_from_the_grid_alone(dense_student):
    assert isinstance(dense_student, GridAssigner)
    assert dense_student.matching_config == {"name": "atss", "anchor_scale": 8.0, "topk": 9}
    sizes = torch.tensor([[SIZE, SIZE]] * 3)
    out = dense_student(torch.randn(3, 3, SIZE, SIZE), sizes)
    matches = dense_student.match(out, _targets(), sizes)
    grid = dense_student.grid_matches(out.points, out.strides, out.level_sizes, _targets(), sizes)
    for b in range(3):
        assert torch.equal(matches.pred_index[b], grid.pred_index[b]) and torch.equal(matches.gt_index[b], grid.gt_index[b])
        expected = out.logits[b, matches.pred_index[b]].detach().sigmoid().amax(-1)
        # the quality weight: one sigmoid (≤ 4 roundings, maybe another vector / scalar path), then a max:
        # assert_close's fp32 default (rtol 1.3e-6 + atol 1e-5 on values ≤ 1) is > 10x
        torch.testing.assert_close(matches.weight[b], expected)
    assert [len(t) for t in matches.extras["pos_thresholds"]] == [0, 1, 3]
    losses, _ = dense_student.loss(out, _targets(), sizes)
    assert set(losses) == {"loss_qfl", "loss_giou", "loss_dfl"} and losses["loss_giou"] > 0 and losses["loss_dfl"] > 0


def test_postprocess_types_and_ranges(student):
    student.eval()
    sizes = torch.tensor([[SIZE, SIZE], [40, 56]])
    with torch.no_grad():
        out = student(torch.randn(2, 3, SIZE, SIZE))
    old = student.score_thresh
    student.score_thresh = 0.0  # a random head scores ~0.01: keep everything to exercise NMS and capping
    try:
        dets = student.postprocess(out, sizes)
    finally:
        student.score_thresh = old
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    for d, (h, w) in zip(dets, sizes.tolist()):
        k = d.boxes.shape[0]
        assert 0 < k <= student.max_detections
        assert d.boxes.shape == (k, 4) and d.scores.shape == (k,) and d.labels.shape == (k,)
        assert d.labels.dtype == torch.int64 and d.boxes.dtype == torch.float32
        assert ((d.labels >= 0) & (d.labels < 3)).all()
        assert ((d.scores > 0) & (d.scores <= 1)).all()
        assert (d.scores[:-1] >= d.scores[1:]).all()  # sorted by score
        assert (d.boxes[:, 0::2] >= 0).all() and (d.boxes[:, 0::2] <= w).all()
        assert (d.boxes[:, 1::2] >= 0).all() and (d.boxes[:, 1::2] <= h).all()
        assert (d.boxes[:, 2:] >= d.boxes[:, :2]).all()
