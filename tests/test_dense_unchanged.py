"""Every dense result is unchanged by the dense/sparse contract: step-0 terms against recorded values.

``golden/dense_terms_911fc8b.json`` was recorded on main at commit 911fc8b (the engine before
Predictions / Matches / pairers) with the same data, models and seeds as below: for two batches
(no flip; two of four images flipped), the student's own QFL / GIoU / DFL and, for every loss
variant x region, the distillation term and the sum of |gradient| over the student's parameters.
"""
import json
from pathlib import Path

import pytest
import torch

from distill.data import DetectionTransform, collate, generate_scenes, load_dataset
from distill.checkpoint import save_checkpoint
from distill.engine.distiller import distillation_terms
from distill.inputs import DistillInputs
from distill.losses import create_loss
from students import create_student
from teachers import load_teacher

SIZE = 64
GOLDEN = json.loads((Path(__file__).parent / "golden" / "dense_terms_911fc8b.json").read_text())
REGIONS = [("main", {}), ("vlr", {}), ("vlr", {"metric": "diou_iof_legacy"}), ("vlr", {"exclude_pos": True}), ("gt_boxes", {}), ("all", {})]
CHANNELS = {"student_channels": 8, "teacher_channels": 16}
VARIANTS = [
    ("kd", {}), ("kd", {"mode": "softmax"}), ("kd", {"legacy": True}),
    ("ld", {}), ("ld", {"normalize": "count"}), ("ld", {"legacy": True}),
    ("feature", CHANNELS), ("feature", {**CHANNELS, "relative": False}), ("feature", {**CHANNELS, "legacy": True}),
]
BATCHES = {0: ([0, 1, 2, 3], (False,) * 4), 1: ([4, 5, 6, 7], (True, False, True, False))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_unchanged")
    generate_scenes(root / "data", num_train=8, num_val=4, size=SIZE, seed=1)
    train = load_dataset(root / "data", "train", DetectionTransform(SIZE))
    torch.manual_seed(0)
    teacher = create_student("gfl", backbone="resnet10t", num_classes=len(train.classes), fpn_channels=16, head_convs=1)
    with torch.no_grad():
        for p in teacher.dense_head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(root / "teacher.safetensors", teacher, {"student": teacher.config, "classes": list(train.classes), "image_size": SIZE})
    return train, load_teacher(root / "teacher.safetensors")


def sides(setup, b):
    train, teacher = setup
    indices, flips = BATCHES[b]
    batch = collate([train.get(i, f) for i, f in zip(indices, flips)])
    torch.manual_seed(1)
    student = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=8, head_convs=1)
    feats = student.features(batch.images)
    preds = student.head(feats, batch.image_sizes)
    own, matches = student.loss(preds, batch.targets, batch.image_sizes)
    t_in = teacher.inputs(batch, None, frozenset({"head", "features"}))
    s_in = DistillInputs(student.spec, preds, feats, matches, batch.image_sizes)
    return student, batch, own, s_in, t_in


@pytest.mark.parametrize("b", [0, 1])
def test_student_losses_unchanged(setup, b):
    _, _, own, _, _ = sides(setup, b)
    for key, value in own.items():
        assert float(value.detach()) == pytest.approx(GOLDEN[f"b{b}/student/{key}"], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("b", [0, 1])
@pytest.mark.parametrize("name,params", VARIANTS, ids=[f"{n}{p}" for n, p in VARIANTS])
def test_distillation_terms_unchanged(setup, b, name, params):
    student, batch, _, s_in, t_in = sides(setup, b)
    for region, rparams in REGIONS:
        torch.manual_seed(3)  # the feature adapter's init, as recorded
        loss = create_loss(name, weight=1.0, pairer=region, pairer_params=rparams, **params)
        loss.check_pair(student.spec, t_in.spec)
        value = distillation_terms([loss], ["x"], DistillInputs(s_in.spec, s_in.predictions, s_in.features, s_in.matches, s_in.image_sizes), t_in, batch.targets)["x"]
        student.zero_grad()
        value.backward(retain_graph=True)
        grad = sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None)
        golden = GOLDEN[f"b{b}/{name}{json.dumps(params, sort_keys=True)}/{region}{json.dumps(rparams, sort_keys=True)}"]
        assert float(value.detach()) == pytest.approx(golden["value"], rel=1e-6, abs=1e-9), (region, rparams)
        assert grad == pytest.approx(golden["grad_abs_sum"], rel=1e-5), (region, rparams)
