"""Bad input through the real CLI: one 'error:' line naming what and where, exit code 2, nothing
written or overwritten. One case per class of the issue-11 probe, plus the ones that already worked."""
import json
import shutil

import pytest
import torch
from cli_helpers import SMALL_FPN8, invoke, make_scenes, one_error_line, train_one_epoch
from PIL import Image

from distill.checkpoint import read_checkpoint

SMALL = SMALL_FPN8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bad")


@pytest.fixture(scope="module")
def data(root):
    return make_scenes(root / "data", train=12)


@pytest.fixture(scope="module")
def run(root, data):
    return train_one_epoch("gfl-tiny", data, root / "run", SMALL)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# ----------------------------------------------------------------------------------- recipes
RECIPE_CASES = [
    (["--set", "train.lr=-1"], "--set train.lr=-1: 'train.lr' must be a finite number > 0"),
    (["--set", "train.lr=nan"], "'train.lr' must be a finite number > 0"),
    (["--set", "train.lr=.inf"], "'train.lr' must be a finite number > 0"),
    (["--set", "train.lr=fast"], "--set train.lr=fast: 'train.lr' must be float"),
    (["--set", "train.batch_size=0"], "'train.batch_size' must be >= 1, got 0"),
    (["--set", "train.batch_size=-2"], "'train.batch_size' must be >= 1, got -2"),
    (["--set", "train.eval_every=0"], "'train.eval_every' must be >= 1"),
    (["--set", "train.num_workers=-1"], "'train.num_workers' must be null (auto) or >= 0"),
    (["--set", "train.threads=0"], "'train.threads' must be null or >= 1"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--set", "train.epochs=0"], "--set train.epochs=0: 'train.epochs' must be >= 1"),
    (["--set", "train.grad_clip=-1"], "'train.grad_clip' must be null or a finite number > 0"),
    (["--set", "train.warmup_steps=-5"], "'train.warmup_steps' must be >= 0"),
    (["--set", "train.warmup_ratio=2"], "'train.warmup_ratio' must be in [0, 1]"),
    (["--set", "train.momentum=1.5"], "'train.momentum' must be in [0, 1)"),
    (["--set", "train.weight_decay=-0.1"], "'train.weight_decay' must be a finite number >= 0"),
    (["--set", "train.milestones=[0]"], "'train.milestones[0]' must be >= 1"),
    (["--set", "eval.batch_size=0"], "'eval.batch_size' must be >= 1"),
    (["--set", "eval.nms_iou=0"], "'eval.nms_iou' must be in (0, 1]"),
    (["--set", "eval.score_thresh=-0.5"], "'eval.score_thresh' must be in [0, 1]"),
    (["--set", "data.hflip_prob=2"], "'data.hflip_prob' must be in [0, 1]"),
    (["--set", "data.image_size=0"], "'data.image_size' must be >= 1"),
    (["--set", "train.optimizer=rmsprop"], "'train.optimizer' must be one of"),
    (["--set", "train.colour=3"], "unknown key 'train.colour'"),
    (["--set", "train.lr"], "expected key=value"),
    (["--set", "losses.9.weight=1"], "--set losses.9.weight=1: 'losses' must be a list"),
    (["--set", "train.batch_size=64"], "fewer than batch_size 64"),
]


@pytest.mark.parametrize("args, expected", RECIPE_CASES, ids=[" ".join(a) for a, _ in RECIPE_CASES])
def test_bad_numbers_and_overrides(args, expected, data, tmp_path):
    line = one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", tmp_path / "r", *SMALL, *args))
    assert expected in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_scientific_notation_is_a_number(data, tmp_path):
    from recipes import load_recipe

    # the parsed literal is the same double: exact
    assert load_recipe("gfl-tiny", ["train.lr=1e-4", "train.weight_decay=5E-2"]).train.lr == 1e-4


def test_recipe_file_errors_name_the_file(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((__import__("recipes").recipe_path("gfl-tiny")).read_text().replace("epochs: 4", "epochs: 0"))
    line = one_error_line(invoke("train", bad, "--data", data, "--out", tmp_path / "r", "--no-progress"))
    assert str(bad) in line and "'train.epochs' must be >= 1" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert "invalid YAML" in one_error_line(invoke("train", broken, "--data", data, "--out", tmp_path / "r2", "--no-progress"))


def test_negative_loss_weight_in_a_distill_recipe(run, data, tmp_path):
    line = one_error_line(invoke("distill", "ld-tiny", "--teacher", run, "--data", data, "--out", tmp_path / "d", *SMALL, "--set", "losses.0.weight=-1"))
    assert "'losses[0].weight' must be a finite number >= 0" in line


@pytest.mark.parametrize("args, expected", [
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--amp", "fp8"], "--amp 'fp8': expected one of off, bf16, fp16"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
])
def test_bad_device_and_precision(args, expected, data, tmp_path):
    assert expected in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", tmp_path / "r", *SMALL, *args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(data, tmp_path):
    assert "CUDA is not available" in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", tmp_path / "r", *SMALL, "--device", "cuda"))


# -------------------------------------------------------------------------------------- data
def mutated(data, tmp_path, split, change):
    """A copy of ``data`` whose ``split``.json went through ``change(dict)``."""
    out = tmp_path / "mut"
    out.mkdir()
    (out / "images").symlink_to(data / "images")
    for name in ("train", "val"):
        content = json.loads((data / f"{name}.json").read_text())
        if name == split:
            change(content)
        (out / f"{name}.json").write_text(json.dumps(content))
    return out


def set_bbox(value):
    def change(d):
        d["annotations"][0]["bbox"] = value
    return change


DATA_CASES = {
    "bbox of 3 numbers": ("train", set_bbox([1, 2, 3]), "bbox must be 4 numbers [x, y, w, h], got [1, 2, 3]"),
    "huge integer bbox": ("train", set_bbox([1, 2, 10**400, 3]), "too large for a float"),
    "negative bbox size": ("train", set_bbox([1, 2, -3, 4]), "non-positive size"),
    "unknown category": ("train", lambda d: d["annotations"][0].update(category_id=999), "unknown category id 999"),
    "annotation of no image": ("train", lambda d: d["annotations"][0].update(image_id=10**6), "no image with this id"),
    "duplicate annotation id": ("train", lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), "duplicate annotation id"),
    "empty val split": ("val", lambda d: d.update(images=[], annotations=[]), "val split has no images"),
    "train without annotations": ("train", lambda d: d.update(annotations=[]), "train split has no annotations"),
    "missing image file": ("train", lambda d: d["images"][0].update(file_name="nope.png"), "nope.png"),
    "no categories": ("train", lambda d: d.update(categories=[]), "'categories' is empty"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(case, data, tmp_path):
    split, change, expected = DATA_CASES[case]
    folder = mutated(data, tmp_path, split, change)
    line = one_error_line(invoke("train", "gfl-tiny", "--data", folder, "--out", tmp_path / "r", *SMALL, "--epochs", 1))
    assert expected in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unreadable_annotation_json(data, tmp_path):
    folder = mutated(data, tmp_path, "train", lambda d: None)
    (folder / "train.json").write_text("{not json")
    assert "train.json" in one_error_line(invoke("train", "gfl-tiny", "--data", folder, "--out", tmp_path / "r", *SMALL))


@pytest.mark.parametrize("name", ["x[/y]", "[bold]odd[/bold]", "a[b"])
def test_paths_with_brackets_print_literally(name, tmp_path):
    line = one_error_line(invoke("train", "gfl-tiny", "--data", tmp_path / name, "--out", tmp_path / "r", "--no-progress"))
    assert name in line


# -------------------------------------------------------------------------------- run folders
def test_existing_run_out_file_and_not_a_run(run, data, tmp_path):
    before = snapshot(run)
    assert "already holds a run" in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", run, *SMALL))
    afile = tmp_path / "file.txt"
    afile.write_text("keep")
    assert "--out is a file" in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", afile, *SMALL))
    assert afile.read_text() == "keep"
    assert "not a detkd run folder" in one_error_line(invoke("train", "--resume", tmp_path, "--no-progress"))
    assert snapshot(run) == before


@pytest.mark.parametrize("command, kind", [("train", "distill"), ("distill", "train")])
def test_resume_of_the_other_kind(command, kind, run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["kind"] = kind
    (copy / "run.json").write_text(json.dumps(info))
    before = snapshot(copy)
    line = one_error_line(invoke(command, "--resume", copy, "--no-progress"))
    assert f"is a {kind} run" in line and f"detkd {kind}" in line
    assert snapshot(copy) == before


def test_corrupt_run_json(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "run.json").write_text("{cut")
    assert "corrupt run.json" in one_error_line(invoke("train", "--resume", copy, "--no-progress"))


@pytest.mark.parametrize("args, expected", [
    (["train", "gfl-tiny", "--out", "somewhere"], "needs --data and --out"),
    (["train"], "missing RECIPE"),
    (["distill", "ld-tiny", "--data", "d", "--out", "o"], "needs --teacher, --data and --out"),
])
def test_missing_options(args, expected, tmp_path):
    assert expected in one_error_line(invoke(*args, "--no-progress"))


def test_distill_of_a_recipe_without_distillation_terms(run, data, tmp_path):
    line = one_error_line(invoke("distill", "gfl-tiny", "--teacher", run, "--data", data, "--out", tmp_path / "d", *SMALL))
    assert "no distillation terms" in line and "detkd train" in line
    assert not (tmp_path / "d").exists()


# -------------------------------------------------------------------------------- checkpoints
def variant(run, tmp_path, name, meta_change=None, state_change=None):
    state, meta = read_checkpoint(run / "checkpoints" / "best.safetensors")
    if meta_change:
        meta_change(meta)
    if state_change:
        state_change(state)
    path = tmp_path / f"{name}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"detkd": json.dumps({"format": "detkd-checkpoint", "version": 1, **meta})})
    return path


def nan_weights(state):
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))


CKPT_CASES = {
    "NaN weights": (None, nan_weights, "holds NaN or inf"),
    "other FPN width": (lambda m: m["student"]["params"].update(fpn_channels=16), None, "weights do not fit"),
    "other backbone": (lambda m: m["student"]["params"].update(backbone="resnet18"), None, "weights do not fit"),
    "unknown backbone": (lambda m: m["student"]["params"].update(backbone="no_such_net"), None, "does not describe a buildable detector"),
    "no image_size": (lambda m: m.pop("image_size"), None, "metadata lacks 'image_size'"),
    "no classes": (lambda m: m.pop("classes"), None, "metadata lacks 'classes'"),
    "student not a mapping": (lambda m: m.update(student="gfl"), None, "'student' must map a name and params"),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
@pytest.mark.parametrize("command", ["eval", "predict", "teacher"])
def test_checkpoints_that_do_not_fit(case, command, run, data, tmp_path):
    meta_change, state_change, expected = CKPT_CASES[case]
    path = variant(run, tmp_path, "v", meta_change, state_change)
    image = data / "images" / sorted(p.name for p in (data / "images").iterdir())[0]
    args = {
        "eval": ["eval", path, "--data", data, "--no-progress"],
        "predict": ["predict", path, image, "--out", tmp_path / "preds"],
        "teacher": ["distill", "ld-tiny", "--teacher", path, "--data", data, "--out", tmp_path / "d", *SMALL],
    }[command]
    if command == "teacher" and case == "no image_size":
        pytest.skip("a teacher's input size comes from the distill recipe")
    assert expected in one_error_line(invoke(*args))
    assert not (tmp_path / "preds").exists() and not (tmp_path / "d" / "checkpoints").exists()


def test_pickle_and_missing_checkpoints(run, data, tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    assert "not a readable safetensors checkpoint" in one_error_line(invoke("eval", evil, "--data", data, "--no-progress"))
    assert "checkpoint not found" in one_error_line(invoke("eval", tmp_path / "none.safetensors", "--data", data, "--no-progress"))
    assert "--batch-size must be >= 1" in one_error_line(invoke("eval", run, "--data", data, "--batch-size", 0, "--no-progress"))


# ------------------------------------------------------------------------------------ predict
def test_predict_refuses_before_writing(run, data, tmp_path, monkeypatch):
    images = sorted((data / "images").iterdir())
    afile = tmp_path / "out.txt"
    afile.write_text("keep")
    assert "--out is a file" in one_error_line(invoke("predict", run, images[0], "--out", afile))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(images[0], other / images[0].name)
    line = one_error_line(invoke("predict", run, images[0], other / images[0].name, "--out", tmp_path / "p"))
    assert "same file name" in line and not (tmp_path / "p").exists()
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    assert "cannot read image" in one_error_line(invoke("predict", run, images[0], text, "--out", tmp_path / "p"))
    assert not (tmp_path / "p").exists()  # the good image was not drawn either: inputs are read first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64x64 scene is then a decompression bomb
    assert "image refused" in one_error_line(invoke("predict", run, images[0], "--out", tmp_path / "p"))


@pytest.mark.parametrize("args, expected", [
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_bad_cache_options(args, expected, run, data, tmp_path):
    assert expected in one_error_line(invoke("cache", run, "--data", data, "--out", tmp_path / "c", "--no-progress", *args))
    assert not (tmp_path / "c").exists()


def test_bracketed_output_paths_are_printed_literally(run, data, tmp_path):
    out = tmp_path / "m[/x]" / "metrics.json"
    result = invoke("eval", run, "--data", data, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "") and out.is_file()
