"""The detkd CLI through typer's runner: real commands on tiny scene data."""
import json

import pytest
import yaml
from cli_helpers import SMALL, api_metrics, invoke, make_scenes, one_error_line, train_one_epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("cli") / "scenes", train=12)


@pytest.fixture(scope="module")
def trained(data):
    return train_one_epoch("gfl-tiny", data, data.parent / "run")


def test_recipes_lists_names_kinds_and_purposes():
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    assert "gfl-tiny" in result.output and "ld-tiny" in result.output and "distill" in result.output


def test_scenes_writes_coco_and_refuses_to_overwrite(data):
    train = json.loads((data / "train.json").read_text())
    assert len(train["images"]) == 12 and len(train["categories"]) == 10
    assert all((data / "images" / im["file_name"]).is_file() for im in train["images"])
    line = one_error_line(invoke("data", "scenes", data, "--train", 2, "--val", 1, "--size", 64))
    assert str(data) in line


def test_train_writes_run_folder(trained):
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "summary.json", "train_state.safetensors", "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (trained / name).is_file(), name
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3  # 12 images / batch 4, one epoch
    assert {"loss_qfl", "loss_giou", "loss_dfl", "lr"} <= set(steps[0])
    assert "val" in records[-1] and set(records[-1]["val"]) >= {"AP", "AP50"}


def test_resume_continues_from_the_last_step(trained, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    result = invoke("train", "--resume", run, "--epochs", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_train_refuses_an_existing_run(trained, data):
    line = one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", trained, *SMALL))
    assert "already holds a run" in line and "--resume" in line


def test_eval_prints_table_and_writes_json(trained, data, tmp_path):
    out = tmp_path / "metrics.json"
    result = invoke("eval", trained, "--data", data, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output
    record = json.loads(out.read_text())
    assert record["images"] == 4 and record["metrics"] == api_metrics(trained, data)  # that checkpoint on that split


def test_eval_class_agnostic_writes_its_own_json(trained, data):
    result = invoke("eval", trained, "--data", data, "--class-agnostic", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "class-agnostic" in result.output
    written = sorted((trained / "checkpoints").glob("*.eval-val-agnostic.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["class_agnostic"] is True


def test_predict_draws_pngs(trained, data, tmp_path):
    image = sorted((data / "images").glob("val_*.png"))[0]
    result = invoke("predict", trained, image, "--out", tmp_path / "preds", "--score-thresh", 0.0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preds" / f"{image.stem}.pred.png").is_file()
    records = json.loads((tmp_path / "preds" / "detections.json").read_text())
    assert records[0]["image"] == str(image)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "gfl-tiny", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["train", "gfl-tiny", "--set", "student.params.colour=3"], "colour"),
        (["train", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
        (["train", "gfl-tiny", "--set", "train.optimizer=adam"], "'train.optimizer' must be one of"),
    ],
)
def test_bad_recipes_exit_2_naming_the_key(args, expected, data, tmp_path):
    result = invoke(*args, "--data", data, "--out", tmp_path / "r", "--no-progress")
    assert expected in one_error_line(result)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_dataset_is_one_line(tmp_path):
    line = one_error_line(invoke("train", "gfl-tiny", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", "--no-progress"))
    assert "nowhere" in line


def test_eval_refuses_data_with_other_classes(trained, tmp_path):
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    for split in ("train", "val"):
        (other / f"{split}.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    line = one_error_line(invoke("eval", trained, "--data", other, "--no-progress"))
    assert "classes do not match" in line


def test_distill_refuses_a_useless_teacher_then_runs_with_force(trained, data, tmp_path):
    # One epoch on 12 images leaves the teacher at AP ~ 0: exactly the case the gate exists for.
    args = ["distill", "ld-tiny", "--teacher", trained, "--data", data, *SMALL, "--epochs", 1]
    line = one_error_line(invoke(*args, "--out", tmp_path / "refused"))
    assert "teacher.min_ap" in line and "--force" in line
    assert not (tmp_path / "refused" / "checkpoints").exists()

    result = invoke(*args, "--out", tmp_path / "forced", "--force")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / "forced" / "metrics.jsonl").read_text().splitlines()]
    keys = set(steps[0])
    assert {"loss_qfl", "loss_ld_main", "loss_ld_vlr", "loss_kd_main", "loss_feature_gt_boxes"} <= keys
    run = json.loads((tmp_path / "forced" / "run.json").read_text())
    assert run["teacher"]["path"].endswith("best.safetensors") and "AP" in run["teacher"]["val"]


def test_demo_trains_teacher_baseline_and_distilled_student_and_compares_them(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--recipe", "ld-tiny", "--epochs", 1, "--teacher-epochs", 1,
            "--train", 16, "--val", 4, "--force", "--no-progress"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "gap closed" in result.output
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["final"]) == {"teacher", "baseline", "distilled"}
    assert summary["recipe"] == "ld-tiny" and summary["teacher_recipe"] == "gfl-tiny"
    assert json.loads((out / "baseline" / "run.json").read_text())["kind"] == "train"
    assert json.loads((out / "distilled" / "run.json").read_text())["kind"] == "distill"
    baseline = yaml.safe_load((out / "baseline" / "recipe.yaml").read_text())
    distilled = yaml.safe_load((out / "distilled" / "recipe.yaml").read_text())
    assert baseline["losses"] == [] and baseline.get("teacher") is None and len(distilled["losses"]) == 4
    assert baseline["student"] == distilled["student"]  # the same student, with and without KD
    assert baseline["train"] == distilled["train"]
    assert len(list((out / "predictions").glob("*.pred.png"))) == 4

    # Running it again reuses the finished runs instead of training them again.
    teacher_ckpt = out / "teacher" / "checkpoints" / "last.safetensors"
    before = teacher_ckpt.stat().st_mtime_ns
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert teacher_ckpt.stat().st_mtime_ns == before
    assert json.loads((out / "demo.json").read_text())["final"] == summary["final"]


def test_demo_refuses_a_recipe_without_a_teacher_recipe(tmp_path):
    line = one_error_line(invoke("demo", "--out", tmp_path / "demo", "--recipe", "gfl-tiny", "--no-progress"))
    assert "gfl-tiny" in line and "teacher.recipe" in line
    assert not (tmp_path / "demo").exists()  # nothing generated before the recipe is accepted


def test_training_is_deterministic_and_resume_after_a_crash_is_exact(data, tmp_path, monkeypatch):
    from distill.engine.trainer import Trainer

    def losses(run):
        steps = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                steps[record["step"]] = record["loss"]  # a re-run step overwrites the crashed one
        return steps

    straight = tmp_path / "straight"
    assert invoke("train", "gfl-tiny", "--data", data, "--out", straight, "--epochs", 2, *SMALL).exit_code == 0
    again = tmp_path / "again"
    assert invoke("train", "gfl-tiny", "--data", data, "--out", again, "--epochs", 2, *SMALL).exit_code == 0
    assert losses(again) == losses(straight)  # same seed, same bytes of loss

    original = Trainer._train_step

    def crash_in_epoch_two(self, batch, step, steps_per_epoch, epoch):
        if step == 4:
            raise KeyboardInterrupt  # the machine went away mid-epoch
        return original(self, batch, step, steps_per_epoch, epoch)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(Trainer, "_train_step", crash_in_epoch_two)
    assert invoke("train", "gfl-tiny", "--data", data, "--out", crashed, "--epochs", 2, *SMALL).exit_code != 0
    monkeypatch.setattr(Trainer, "_train_step", original)
    result = invoke("train", "--resume", crashed, "--no-progress")
    assert result.exit_code == 0, result.output
    assert losses(crashed) == losses(straight)  # resumed from the end of epoch 1: identical steps 3-5
