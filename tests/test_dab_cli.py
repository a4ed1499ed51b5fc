"""DAB-DETR through the detkd CLI: train (Group DETR, every layer's loss), eval, predict, as a frozen
teacher of a one-layer ASAG student, as a student itself (shared queries), and its query-row cache."""
import json

import pytest
import yaml
from cli_helpers import SMALL, invoke, make_scenes, train_one_epoch
from test_asag_cli import check_eval_and_predict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("dab-cli") / "scenes")


@pytest.fixture(scope="module")
def trained(data):
    return train_one_epoch("dab6-tiny", data, data.parent / "run")


def steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_logs_every_decoder_layer(trained):
    records = steps(trained)
    assert len(records) == 2  # 8 images / batch 4, one epoch
    assert {"loss_cls", "loss_l1", "loss_giou", "loss_cls_layer0", "loss_giou_layer4"} <= set(records[0])
    assert "loss_cls_layer5" not in records[0]  # layer 5 is the main head
    assert (trained / "checkpoints" / "last.safetensors").is_file()


def test_eval_and_predict(trained, data, tmp_path):
    check_eval_and_predict(trained, data, tmp_path)


def test_one_layer_asag_distills_from_dab_detr(trained, data, tmp_path):
    out = tmp_path / "kd"
    result = invoke(
        "distill", "asag-kd-tiny", "--teacher", trained, "--data", data, "--out", out, "--epochs", 1, "--force",
        "--set", "teacher.min_ap=0.0", *SMALL,
    )
    assert result.exit_code == 0, result.output
    first = steps(out)[0]
    for key in ("loss_cls", "loss_kd_gt_bridged", "loss_box_gt_bridged", "loss_kd_teacher_set", "loss_kd_shared_queries"):
        assert key in first and first[key] == first[key], key  # present and not NaN


def dab_student_recipe(path, teacher_recipe: str = "dab6-tiny"):
    recipe = {
        "name": "dab-from-dab", "kind": "distill", "purpose": "test: one-layer DAB-DETR from the six-layer one",
        "student": {"name": "dab_detr", "params": {"backbone": "resnet10t", "strides": [8, 16, 32], "hidden_dim": 32,
                                                  "num_queries": 10, "num_heads": 4, "ffn_dim": 64, "decoder_layers": 1,
                                                  "encoder_layers": 0}},
        "teacher": {"recipe": teacher_recipe, "min_ap": 0.0},
        "data": {"image_size": 64},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.002, "warmup_steps": 0, "grad_clip": 1.0, "eval_every": 1},
        "losses": [
            {"name": "kd", "weight": 1.0, "pairer": "shared_queries", "pairer_params": {"top_k": 10}},
            {"name": "box", "weight": 1.0, "pairer": "gt_bridged"},
            {"name": "kd", "weight": 0.5, "pairer": "teacher_set", "pairer_params": {"top_k": 10}},
        ],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_dab_detr_student_distils_through_shared_queries_and_from_a_cache(trained, data, tmp_path):
    recipe = dab_student_recipe(tmp_path / "dab-from-dab.yaml")
    built = invoke("cache", trained, "--data", data, "--out", tmp_path / "cache", "--recipe", recipe, "--no-progress")
    assert built.exit_code == 0, built.output
    runs = {}
    for name, extra in (("online", []), ("cached", ["--cache", tmp_path / "cache"])):
        out = tmp_path / name
        result = invoke("distill", recipe, "--teacher", trained, "--data", data, "--out", out, "--force", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        runs[name] = steps(out)[0]
        assert (out / "checkpoints" / "last.safetensors").is_file()
    for key in ("loss_kd_shared_queries", "loss_box_gt_bridged", "loss_kd_teacher_set"):
        assert runs["online"][key] == runs["online"][key] and runs["online"][key] > 0, key
    for key in ("loss_box_gt_bridged", "loss_kd_teacher_set", "loss_cls"):  # served from stored query rows
        # fp16 query rows: rel 2e-3 ≈ 4 · u16, as for the dense cache (tests/test_cache.py's docstring)
        assert runs["cached"][key] == pytest.approx(runs["online"][key], rel=2e-3), key


def test_resume_continues_the_run_and_bf16_autocast_trains(trained, data, tmp_path):
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(trained, copy)
    result = invoke("train", "--resume", copy, "--epochs", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in steps(copy)] == [r["step"] for r in steps(trained)] + [2, 3]
    out = tmp_path / "bf16"
    result = invoke("train", "dab6-tiny", "--data", data, "--out", out, "--epochs", 1, "--amp", "bf16", "--device", "cpu", *SMALL)
    assert result.exit_code == 0, result.output
    assert all(r["loss"] == r["loss"] for r in steps(out))  # finite (not NaN) under bf16 autocast
