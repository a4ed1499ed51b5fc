"""Every failure ends in exit code 2 and one line naming the problem, with nothing overwritten and
nothing left behind (issue 18): full disks, unwritable outputs, outputs that would destroy data,
library temporaries left by kills, val splits that cannot be scored, stub run folders, torchrun."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import yaml
from cli_helpers import SMALL_FPN8, invoke, make_scenes, one_error_line, train_one_epoch
from ddp_helpers import HANG_GUARD_S
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tolerances import FP32_FEW_OPS
from toy_query import ToyQuery  # noqa: F401  registers the sparse toy detector

from distill.checkpoint import remove_temp_files, save_checkpoint

SMALL = SMALL_FPN8
NEEDS = re.compile(r"needs [\d.]+ (bytes|KB|MB|GB), [\d.]+ (bytes|KB|MB|GB) free")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("failures")


@pytest.fixture(scope="module")
def data(root):
    return make_scenes(root / "data", train=12)


@pytest.fixture(scope="module")
def run(root, data):
    return train_one_epoch("gfl-tiny", data, root / "run", SMALL)


@pytest.fixture(scope="module")
def sparse_teacher(root, data):
    """A random toy query detector (the sparse family's contract) saved as a teacher checkpoint."""
    from students import create_student

    classes = [c["name"] for c in sorted(json.loads((data / "train.json").read_text())["categories"], key=lambda c: c["id"])]
    torch.manual_seed(1)
    toy = create_student("toy_query", num_classes=len(classes))
    path = root / "sparse_teacher.safetensors"
    save_checkpoint(path, toy, {"student": toy.config, "classes": classes, "image_size": 64})
    return path


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def hidden(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def full_disk(monkeypatch, match: str):
    """ENOSPC from the fsync of a detkd temporary whose name contains ``match`` (where a full disk shows)."""
    real = os.fsync

    def fsync(fd):
        if match in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ------------------------------------------------------------------------ 1. disk full in a save
def test_disk_full_in_a_training_save_names_file_space_and_what_is_kept(run, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    kept = {k: v for k, v in snapshot(copy).items() if k.endswith(".safetensors") or k.endswith(".json")}
    full_disk(monkeypatch, ".safetensors.")
    line = one_error_line(invoke("train", "--resume", copy, "--epochs", 2, "--no-progress"))
    assert ".safetensors: cannot write (No space left on device; needs" in line and NEEDS.search(line), line
    assert f"the run keeps its last saved step (epoch 1, step 3): free space and resume with detkd train --resume {copy}" in line
    assert {k: v for k, v in snapshot(copy).items() if k in kept} == kept  # every checkpoint, state and record as it was
    assert hidden(copy) == []
    monkeypatch.undo()
    result = invoke("train", "--resume", copy, "--epochs", 2, "--no-progress")  # space freed: it goes on from step 3
    assert result.exit_code == 0, result.output
    steps = [json.loads(l)["step"] for l in (copy / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]
    assert steps == list(range(6))


def test_disk_full_in_the_metrics_log(run, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    real = open

    def full(path, mode="r", *args, **kwargs):
        if mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr("distill.checkpoint.open", full, raising=False)
    line = one_error_line(invoke("train", "--resume", copy, "--epochs", 2, "--no-progress"))
    assert f"{copy / 'metrics.jsonl'}: cannot write (No space left on device; needs" in line and NEEDS.search(line)
    assert "the lines before are kept" in line and "the run keeps its last saved step (epoch 1, step 3)" in line


def test_disk_full_in_a_sparse_distill_run(sparse_teacher, data, tmp_path, monkeypatch):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "toy-distill", "kind": "distill", "purpose": "test", "student": {"name": "toy_query", "params": {}},
        "data": {"image_size": 64}, "train": {"epochs": 1, "batch_size": 4, "lr": 0.005, "warmup_steps": 0, "seed": 0},
        "eval": {"batch_size": 4}, "teacher": {"min_ap": 0.0}, "losses": [{"name": "kd", "pairer": "gt_bridged"}],
    }))
    full_disk(monkeypatch, ".train_state.safetensors.")
    out = tmp_path / "d"
    line = one_error_line(invoke("distill", recipe, "--teacher", sparse_teacher, "--data", data, "--out", out, "--no-progress"))
    assert f"{out / 'train_state.safetensors'}: cannot write (No space left on device; needs" in line and NEEDS.search(line)
    assert "nothing was written; the run has no saved step yet" in line
    assert not (out / "train_state.safetensors").exists() and hidden(out) == []


@pytest.mark.parametrize("family", ["dense", "sparse"])
def test_disk_full_in_a_cache_shard_keeps_the_complete_shards(family, run, sparse_teacher, data, tmp_path, monkeypatch):
    teacher, extra = (run, ["--recipe", "ld-tiny", "--set", "data.image_size=64"]) if family == "dense" else (sparse_teacher, [])
    out = tmp_path / "c"
    full_disk(monkeypatch, ".shard-00001.safetensors.")
    args = ["cache", teacher, "--data", data, "--out", out, "--shard-size", 4, "--variants", "none", "--no-progress", *extra]
    line = one_error_line(invoke(*args))
    assert f"{out / 'shard-00001.safetensors'}: cannot write (No space left on device; needs" in line and NEEDS.search(line)
    assert "the cache keeps its 1 complete shards: free space and rerun the same command to resume" in line
    assert [s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == ["shard-00000.safetensors"]
    assert hidden(out) == []
    monkeypatch.undo()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_a_safetensors_error_in_a_write_is_an_output_error(tmp_path):
    from safetensors import SafetensorError

    from distill.checkpoint import atomic_write
    from distill.errors import OutputError

    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    with pytest.raises(OutputError, match=r"x.safetensors: cannot write \(Error while serializing.*\); the previous file is kept"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.safetensors"]


# --------------------------------------------------------------------- 2. unwritable outputs
def commands(run, data, out):
    image = sorted((data / "images").iterdir())[0]
    return {
        "cache dense": ["cache", run, "--data", data, "--out", out, "--no-progress"],
        "train": ["train", "gfl-tiny", "--data", data, "--out", out, *SMALL],
        "distill": ["distill", "ld-tiny", "--teacher", run, "--data", data, "--out", out, "--force", *SMALL[:4], "--no-progress"],
        "eval": ["eval", run, "--data", data, "--out", out / "m.json", "--no-progress"],
        "predict": ["predict", run, image, "--out", out],
        "data scenes": ["data", "scenes", out, "--train", 2, "--val", 1, "--size", 64],
        "demo": ["demo", "--out", out, "--train", 8, "--val", 4, "--no-progress", "--device", "cpu"],
    }


COMMANDS = ["cache dense", "cache sparse", "train", "distill", "eval", "predict", "data scenes", "demo"]


def command(name, run, sparse_teacher, data, out):
    if name == "cache sparse":
        return ["cache", sparse_teacher, "--data", data, "--out", out, "--no-progress"]
    return commands(run, data, out)[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_an_output_below_a_file_is_refused_before_any_work(name, run, sparse_teacher, data, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    line = one_error_line(invoke(*command(name, run, sparse_teacher, data, blocker / "out")))
    assert f"cannot be created, {blocker} is a file" in line
    assert blocker.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_read_only_output_folder_is_refused_before_any_work(name, run, sparse_teacher, data, tmp_path, monkeypatch):
    """Simulated (the tests may run as root, which ignores permissions): the probe file gets EROFS."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".detkd-probe"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    before = snapshot(data), snapshot(run)
    line = one_error_line(invoke(*command(name, run, sparse_teacher, data, tmp_path / "out")))
    assert "is not writable (Read-only file system in" in line and "nothing was done" in line
    assert os.listdir(tmp_path) == [] and (snapshot(data), snapshot(run)) == before


# -------------------------------------------------------------- 3. outputs that destroy data
def test_eval_never_writes_into_a_dataset_a_checkpoint_or_a_run_file(run, data, tmp_path):
    before = snapshot(data), snapshot(run)
    cases = {
        data / "val.json": "is inside the dataset folder",
        data / "new.json": "is inside the dataset folder",
        run / "checkpoints" / "best.safetensors": "is a checkpoint file",
        run / "checkpoints" / "best.json": "is the metadata of the checkpoint best.safetensors",
        run / "checkpoints" / "notes.json": "is inside the checkpoint folder",
        run / "summary.json": "is a file of the run folder",
    }
    for out, expected in cases.items():
        for extra in ([], ["--overwrite"]):  # not even when told to
            line = one_error_line(invoke("eval", run, "--data", data, "--out", out, "--no-progress", *extra))
            assert f"{out}: --out {expected}" in line, line
    assert (snapshot(data), snapshot(run)) == before


def test_eval_replaces_only_its_own_record_unless_told(run, data, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    line = one_error_line(invoke("eval", run, "--data", data, "--out", notes, "--no-progress"))
    assert "exists and was not written by this command; pass --overwrite" in line and notes.read_text() == '{"mine": 1}'
    record = tmp_path / "m.json"
    for _ in range(2):  # a second evaluation replaces the first's record
        result = invoke("eval", run, "--data", data, "--out", record, "--no-progress")
        assert result.exit_code == 0, result.output
    result = invoke("eval", run, "--data", data, "--out", notes, "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(notes.read_text())["split"] == "val"


def test_predict_train_cache_scenes_and_demo_refuse_outputs_that_destroy_data(run, data, tmp_path):
    before = snapshot(data), snapshot(run)
    image = sorted((data / "images").iterdir())[0]
    line = one_error_line(invoke("predict", run, image, "--out", data / "images"))
    assert f"{data / 'images'}: --out is inside the dataset folder {data}" in line
    line = one_error_line(invoke("predict", run, image, "--out", run / "checkpoints" / "preds"))
    assert "is inside the checkpoint folder" in line
    line = one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", data, *SMALL))
    assert f"{data}: --out is the dataset folder {data} of --data" in line
    line = one_error_line(invoke("cache", run, "--data", data, "--out", data / "cache", "--no-progress"))
    assert "is inside the dataset folder" in line
    line = one_error_line(invoke("data", "scenes", run, "--train", 2, "--val", 1, "--size", 64, "--overwrite"))
    assert "is not a dataset" in line and "--overwrite replaces only a dataset" in line
    line = one_error_line(invoke("demo", "--out", run, "--no-progress", "--device", "cpu"))
    assert "is a folder that holds other files" in line
    assert (snapshot(data), snapshot(run)) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.json").write_text("mine")
    line = one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", foreign, *SMALL))
    assert "is a folder that holds other files" in line and snapshot(foreign) == {"summary.json": b"mine"}
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "detections.json").write_text("mine")
    assert "detections.json" in one_error_line(invoke("predict", run, image, "--out", preds))
    assert (preds / "detections.json").read_text() == "mine"
    for extra in (["--overwrite"], []):  # told; then its own detections.json is replaced without asking
        result = invoke("predict", run, image, "--out", preds, *extra)
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------- 6. temporaries left by a kill
KILLED_SAVE = textwrap.dedent("""
    import sys, torch
    from distill.checkpoint import save_checkpoint, save_train_state
    model = torch.nn.Linear(2000, 2000)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 2000)).sum().backward()
    optimizer.step()
    print("ready", flush=True)
    while True:
        save_checkpoint(sys.argv[1] + "/last.safetensors", model, {"student": {}, "classes": []})
        save_train_state(sys.argv[1] + "/train_state.safetensors", optimizer, {}, {"epoch": 0}, model=model)
""")


def writing(folder) -> bool:
    """A hidden file holding bytes exists: a save is under way (whoever named the file)."""
    for name in os.listdir(folder):
        try:
            if name.startswith(".") and os.stat(folder / name).st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


def test_a_kill_inside_a_save_leaves_only_detkd_named_temporaries(tmp_path):
    """SIGKILL at random moments of 16 MB writes: every file left is the target or detkd's
    ``.NAME.XXXXXXXX.tmp``, never a library's ``.tmpXXXXXX``; cleanup removes them all."""
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVE)
    caught = 0
    for attempt in range(2):
        folder = tmp_path / f"k{attempt}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 20
        while not writing(folder) and time.monotonic() < deadline:  # kill with bytes on their way to disk
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = os.listdir(folder)
        temporaries = [n for n in names if n.startswith(".")]
        assert all(re.fullmatch(r"\.(last\.safetensors|last\.json|train_state\.safetensors)\.\w+\.tmp", n) for n in temporaries), names
        caught += bool(temporaries)
        remove_temp_files(folder)
        assert not [n for n in os.listdir(folder) if n.startswith(".")]
    assert caught >= 1  # at least one kill landed inside a write


def test_resume_removes_detkd_and_library_temporaries(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for name in (".train_state.safetensors.ab12cd34.tmp", ".tmpAbC123"):  # ours, and safetensors' of older detkd
        (copy / name).write_bytes(b"half")
        (copy / "checkpoints" / name).write_bytes(b"half")
    (copy / "checkpoints" / ".tmpnotes").write_bytes(b"a user's file: not a temporary name")
    result = invoke("train", "--resume", copy, "--no-progress")
    assert result.exit_code == 0, result.output
    assert hidden(copy) == [".tmpnotes"]


# ------------------------------------------------------------------ 7. a val split with no GT
def without_val_annotations(data, tmp_path):
    folder = tmp_path / "noval"
    folder.mkdir()
    (folder / "images").symlink_to(data / "images")
    shutil.copy(data / "train.json", folder / "train.json")
    val = json.loads((data / "val.json").read_text())
    val["annotations"] = []
    (folder / "val.json").write_text(json.dumps(val))
    return folder


def test_a_val_split_without_annotations_is_refused_at_start(run, data, tmp_path):
    folder = without_val_annotations(data, tmp_path)
    for args in (["train", "gfl-tiny", "--data", folder, "--out", tmp_path / "r", *SMALL],
                 ["distill", "ld-tiny", "--teacher", run, "--data", folder, "--out", tmp_path / "r", "--force", *SMALL[:4], "--no-progress"],
                 ["eval", run, "--data", folder, "--out", tmp_path / "m.json", "--no-progress"]):
        line = one_error_line(invoke(*args))
        assert f"{folder / 'val.json'}: the val split has 4 images but no annotations" in line
        assert not (tmp_path / "r").exists() and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------- also
def test_a_command_refused_at_start_leaves_no_run_folder(run, data, tmp_path, monkeypatch):
    line = one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", tmp_path / "r", *SMALL, "--set", "train.batch_size=64"))
    assert "fewer than batch_size 64" in line and not (tmp_path / "r").exists()
    line = one_error_line(invoke("distill", "ld-tiny", "--teacher", run, "--data", data, "--out", tmp_path / "d", *SMALL[:4], "--no-progress"))
    assert "teacher.min_ap" in line and not (tmp_path / "d").exists()
    from distill.engine import trainer
    from distill.errors import DataError

    def refuse(self, resume=False):  # a refusal after the run folder was written: it is removed again
        raise DataError("refused by the test")

    monkeypatch.setattr(trainer.Trainer, "fit", refuse)
    assert "refused by the test" in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", tmp_path / "r", *SMALL))
    assert not (tmp_path / "r").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert "refused by the test" in one_error_line(invoke("train", "gfl-tiny", "--data", data, "--out", existing, *SMALL))
    assert existing.is_dir()  # a folder the command did not create stays


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_demo_on_cuda_without_cuda_refuses_before_generating_data(tmp_path):
    line = one_error_line(invoke("demo", "--out", tmp_path / "demo", "--device", "cuda", "--no-progress"))
    assert "--device cuda: CUDA is not available" in line and not (tmp_path / "demo").exists()


def test_resume_with_fewer_epochs_than_done_says_how_many_were_done(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    state = copy / "train_state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        meta = json.loads(f.metadata()["detkd_train_state"])
    meta["info"].update(epoch=2, step=9)  # as if 3 epochs were done
    save_file(load_file(str(state)), str(state), metadata={"detkd_train_state": json.dumps(meta)})
    before = snapshot(copy)
    line = one_error_line(invoke("train", "--resume", copy, "--epochs", 2, "--no-progress"))
    assert "the run has already done 3 epochs (step 9); train.epochs 2 is fewer" in line and "--epochs 4 or more" in line
    assert snapshot(copy) == before


def torchrun(launcher, *args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*launcher, "--nproc-per-node", "2", *map(str, args)], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_torchrun_ranks_print_one_line_and_the_launcher_nothing_else(run, data):
    """Both ranks refuse; rank 0 alone prints, and the launcher adds nothing."""
    args = ["-m", "distill", "train", "gfl-tiny", "--data", data, "--out", run, "--no-progress"]
    launched = torchrun([sys.executable, "-m", "distill.launch"], *args)
    assert launched.returncode == 2  # (plain torchrun: the same one rank-0 line, then torch's own ChildFailedError report)
    assert [l for l in launched.stderr.splitlines() if l.strip()] == [f"error: {run}: already holds a run; pass --resume {run} to continue it, or choose another --out"]


def test_the_launcher_prints_the_line_of_a_rank_other_than_0(tmp_path):
    script = tmp_path / "one_rank.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        import typer
        from distill.cli.app import user_errors
        from distill.errors import DataError

        @user_errors
        def main():
            if os.environ["RANK"] == "1":
                raise DataError("only rank 1 sees this")
            time.sleep(60)

        try:
            main()
        except typer.Exit as exc:  # what typer's app does with it
            sys.exit(exc.exit_code)
    """))
    launched = torchrun([sys.executable, "-m", "distill.launch"], script)
    assert launched.returncode == 2
    assert [l for l in launched.stderr.splitlines() if l.strip()] == ["error: only rank 1 sees this"]


# ------------------------------------------------------------ 5. non-finite sparse training
def test_indices_computed_from_nan_predictions_give_nan_losses_not_crashes():
    from distill.losses.ld import reencode_bins
    from students.common.losses import distribution_focal_loss
    from students.sparse.asag.generator_targets import match_patches

    logits = torch.zeros(3, 5, requires_grad=True)
    loss = distribution_focal_loss(logits, torch.tensor([1.5, float("nan"), 4.0]))
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    # uniform bins: CE = log 5 on both sides (each an fp32 log, maybe by other paths; FP32_FEW_OPS, tests/tolerances.py)
    assert loss[0].item() == pytest.approx(torch.tensor(5.0).log().item(), rel=FP32_FEW_OPS)
    loss[[0, 2]].sum().backward()
    assert torch.isfinite(logits.grad).all()

    probs = torch.full((2, 4, 3), 1 / 3)
    centers = torch.tensor([[10.0, 10.0], [float("nan"), 10.0]])
    out = reencode_bins(probs, torch.full((2, 2), 10.0), torch.ones(2, 4), centers, torch.ones(2, 4), 5)
    assert torch.isnan(out[1, [0, 2]]).all()  # the left and right edges hang on the NaN x of the centre
    assert torch.allclose(out[1, [1, 3]].sum(-1), torch.ones(2)) and torch.allclose(out[0].sum(-1), torch.ones(4))

    cost = torch.tensor([[[0.0, float("nan")], [1.0, 0.0], [float("inf"), 2.0]]])  # one patch, 3 predictions, 2 GTs
    patch, pred, gt = match_patches(cost, torch.tensor([[True, True]]))
    assert sorted(zip(pred.tolist(), gt.tolist())) == [(0, 0), (1, 1)]


def last_error(output):
    lines = error_lines(output)
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


BLOW_UP = ["--set", "train.lr=1e4", "--set", "train.grad_clip=null", "--set", "train.warmup_steps=0"]


def test_a_diverging_sparse_run_and_its_resume_stop_at_the_guard(data, tmp_path):
    out = tmp_path / "asag"
    args = ["--set", "data.image_size=64", "--set", "train.batch_size=4", *BLOW_UP, "--no-progress"]
    result = invoke("train", "asag-tiny", "--data", data, "--out", out, "--epochs", 3, *args)
    assert result.exit_code == 2
    line = last_error(result.output)
    assert "3 steps in a row were not finite" in line and "loss_cls" in line and "more terms" in line
    state = (out / "train_state.safetensors").read_bytes()
    result = invoke("train", "--resume", out, "--no-progress")  # resuming meets the same guard, not a crash
    assert result.exit_code == 2 and "3 steps in a row were not finite" in last_error(result.output)
    assert (out / "train_state.safetensors").read_bytes() == state  # the last good step is kept


def test_a_diverging_sparse_student_distilled_from_a_sparse_teacher_stops_at_the_guard(sparse_teacher, data, tmp_path):
    recipe = tmp_path / "sparse-kd.yaml"
    student = yaml.safe_load((__import__("recipes").recipe_path("asag-tiny")).read_text())["student"]
    recipe.write_text(yaml.safe_dump({
        "name": "sparse-kd", "kind": "distill", "purpose": "test", "student": student,
        # batch 2: 6 steps an epoch, so the guard stops the run inside epoch 1 (no evaluation to wait for)
        "data": {"image_size": 64}, "train": {"epochs": 1, "batch_size": 2, "lr": 1e4, "warmup_steps": 0, "seed": 0},
        "eval": {"batch_size": 4}, "teacher": {"min_ap": 0.0},
        "losses": [{"name": "kd", "pairer": "teacher_set"}, {"name": "box", "pairer": "teacher_set"}],
    }))
    result = invoke("distill", recipe, "--teacher", sparse_teacher, "--data", data, "--out", tmp_path / "d", "--no-progress")
    assert result.exit_code == 2
    assert "3 steps in a row were not finite" in last_error(result.output)
