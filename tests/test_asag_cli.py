"""The sparse detectors through the detkd CLI (train / eval / predict): the 6-stage teacher, back as a
frozen teacher, and the one-layer ASAG-S student with its anchor generator."""
import json

import pytest
from cli_helpers import SMALL, api_metrics, invoke, make_scenes, train_one_epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("asag-cli") / "scenes")


@pytest.fixture(scope="module")
def trained(data):
    return train_one_epoch("sparse6-tiny", data, data.parent / "run")


def test_train_logs_every_stage_loss(trained, data):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2  # 8 images / batch 4, one epoch
    assert {"loss_cls", "loss_l1", "loss_giou", "loss_cls_prop", "loss_giou_stage4"} <= set(steps[0])
    # the logged total is the sum of the logged (weighted) terms: no term trains unlogged
    # (float32 values of ~20 positive terms: rounding ~1e-6 relative)
    for step in steps:
        assert step["loss"] == pytest.approx(sum(v for k, v in step.items() if k.startswith("loss_")), rel=1e-5)
    # the epoch's evaluation is the saved checkpoint's metrics on val
    assert records[-1]["val"] == api_metrics(trained, data)


def check_eval_and_predict(run, data, tmp_path):
    result = invoke("eval", run, "--data", data, "--out", tmp_path / "m.json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == api_metrics(run, data)  # that checkpoint on that split
    image = sorted((data / "images").glob("val_*.png"))[0]
    result = invoke("predict", run, image, "--out", tmp_path / "preds", "--score-thresh", 0.0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preds" / f"{image.stem}.pred.png").is_file()


def test_eval_and_predict(trained, data, tmp_path):
    check_eval_and_predict(trained, data, tmp_path)


def test_sparse_run_loads_as_a_frozen_teacher(trained):
    import torch

    from teachers import load_teacher

    teacher = load_teacher(trained)
    model = teacher.model
    assert model.family == "sparse" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # pinned: stays in eval mode
    assert not model.training
    with torch.no_grad():
        out = model.head(model.features(torch.randn(1, 3, 64, 64)), torch.tensor([[64, 64]]))
    assert out.aux == [] and out.logits.shape[1] == 50


def test_asag_student_distills_from_the_sparse_teacher(trained, data, tmp_path):
    out = tmp_path / "kd"
    result = invoke(
        "distill", "asag-kd-tiny", "--teacher", trained, "--data", data, "--out", out, "--epochs", 1, "--force",
        "--set", "teacher.min_ap=0.0", *SMALL,
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for key in ("loss_cls", "loss_dfl", "loss_cls_head0", "loss_kd_gt_bridged", "loss_box_gt_bridged", "loss_kd_teacher_set", "loss_kd_shared_queries"):
        assert key in steps[0] and steps[0][key] == steps[0][key], key  # present and not NaN


def test_ld_reaches_the_sparse_bins_student_from_a_gfl_teacher(data):
    import torch

    import distill
    from distill.data import DetectionTransform, collate, load_dataset
    from distill.engine.distiller import Distiller
    from students import create_student

    train = load_dataset(data, "train", DetectionTransform(64))
    batch = collate([train.get(i, False) for i in range(4)])
    torch.manual_seed(0)
    teacher = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=16, head_convs=1)
    student = create_student(
        "asag_s", backbone="resnet10t", num_classes=10, strides=[8, 16, 32], fpn_channels=16, num_queries=8, ffn_dim=32,
        dynamic_dim=8, num_heads=4, roi_canonical=48.0, box_head="bins",
    )
    ld = distill.create_loss("ld", weight=1.0, pairer="gt_bridged")
    distiller = Distiller(student, teacher, [ld])
    student.train()
    terms = distiller.step(student, batch)
    key = next(k for k in terms if k.startswith("loss_ld"))
    assert torch.isfinite(terms[key]) and float(terms[key].detach()) > 0
    sum(terms.values()).backward()
    assert student.heads[-1].reg_out.weight.grad.abs().sum() > 0


def test_asag_student_with_its_generator_trains_evaluates_and_predicts(data, tmp_path):
    run = tmp_path / "asag"
    result = invoke("train", "asag-tiny", "--data", data, "--out", run, "--epochs", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss_anchor_cls", "loss_anchor_l1", "loss_anchor_giou", "loss_cls", "loss_giou", "loss_dfl"):
        assert key in record, key  # the generator is trained with the detector, through the engine
    check_eval_and_predict(run, data, tmp_path)


def test_asag_student_imitates_the_p3_p5_maps_of_a_p3_p7_gfl_teacher(data):
    # ASAG-S has FPN maps at strides 8-32, the GFL teacher at 8-128: feature mimicking pairs the
    # student's three levels with the teacher's first three (same stride) through the 1x1 adapter.
    import torch

    import distill
    from distill.data import DetectionTransform, collate, load_dataset
    from distill.engine.distiller import Distiller
    from students import create_student

    train = load_dataset(data, "train", DetectionTransform(64))
    batch = collate([train.get(i, False) for i in range(4)])
    torch.manual_seed(0)
    teacher = create_student("gfl", backbone="resnet10t", num_classes=10, fpn_channels=32, head_convs=1).eval()
    student = create_student(
        "asag_s", backbone="resnet10t", num_classes=10, strides=[8, 16, 32], fpn_channels=16, num_queries=8, ffn_dim=32,
        dynamic_dim=8, num_heads=4, roi_canonical=48.0,
    )
    feature = distill.create_loss("feature", weight=1.0, pairer="all", student_channels=16, teacher_channels=32)
    distiller = Distiller(student, teacher, [feature])
    student.train()
    terms = distiller.step(student, batch)
    value = terms["loss_feature_all"]
    # by hand: relative squared error of the adapted student maps against the teacher's P3-P5
    with torch.no_grad():
        s_maps = student.features(batch.images)
        t_maps = teacher.features(batch.images)[:3]
        w, b = feature.adapter.weight.flatten(1), feature.adapter.bias
        num = sum(((torch.einsum("oc,bchw->bohw", w, s) + b[:, None, None]) - t).pow(2).sum() for s, t in zip(s_maps, t_maps))
        den = sum(t.pow(2).sum() for t in t_maps)
    assert len(teacher.features(batch.images)) == 5
    # the same maps (same kernels, this process); the adapter as a 1x1 conv vs an einsum (dots of 16: ≤ 4
    # roundings), squared differences (~2x cancellation), sums over ≤ 1.1e4 terms (≤ 14): ≈ 40 roundings,
    # 2.4e-6; 1e-4 is 40x
    assert float(value.detach()) == pytest.approx(float(num / den), rel=1e-4)
    value.backward()
    assert feature.adapter.weight.grad.abs().sum() > 0
    for part in (student.fpn, student.backbone):  # the imitation trains the student's representation
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in student.heads.parameters())  # and nothing the maps do not feed
    assert all(p.grad is None for p in teacher.parameters())
