"""A run survives kills, NaNs, full disks and resumes from anywhere (issue 11)."""
import errno
import json
import os
import pickle
import shutil

import pytest
import torch
from cli_helpers import SMALL_FPN8, invoke, make_scenes, one_error_line, train_one_epoch
from safetensors.torch import load_file

from distill.checkpoint import load_train_state, read_checkpoint
from distill.engine import trainer as trainer_module
from distill.errors import CheckpointError
from students.saved import load_detector

SMALL = SMALL_FPN8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("survive") / "data", train=12)


@pytest.fixture(scope="module")
def run(data):
    return train_one_epoch("gfl-tiny", data, data.parent / "run", SMALL)


def train(data, out, *extra):
    return invoke("train", "gfl-tiny", "--data", data, "--out", out, *SMALL, *extra)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ non-finite steps
def poison(monkeypatch, steps):
    """Make the QFL term NaN at the given step indices."""
    original = trainer_module.detector_step
    counter = {"n": -1}

    def step(model, batch):
        counter["n"] += 1
        losses = original(model, batch)
        if counter["n"] in steps:
            losses["loss_qfl"] = losses["loss_qfl"] * float("nan")
        return losses

    monkeypatch.setattr(trainer_module.Trainer, "__init__", _with_step(trainer_module.Trainer.__init__, step))
    return step


def test_a_nan_step_is_skipped_with_a_warning_naming_the_term(data, tmp_path, monkeypatch):
    from distill.engine.run import train_run
    from recipes import load_recipe

    poison(monkeypatch, {2})  # the last step of epoch 1
    recipe = load_recipe("gfl-tiny", ["data.image_size=64", "train.batch_size=4", "student.params.fpn_channels=8", "train.epochs=1"])
    train_run(recipe, data, tmp_path / "r", show_progress=False)
    logged = records(tmp_path / "r")
    assert [r.get("skipped") for r in logged if "step" in r and "val" not in r] == [None, None, "loss_qfl"]
    read_checkpoint(tmp_path / "r" / "checkpoints" / "last.safetensors")  # finite: refused otherwise


def test_a_step_with_finite_loss_but_non_finite_gradients_names_the_tensors(data, tmp_path, monkeypatch, capsys):
    """The loss is finite, one tensor's gradient is not (what a bad cast or a log of zero in a
    backward pass does): the step is skipped and the log and the warning name that tensor."""
    from distill.engine.run import train_run
    from recipes import load_recipe

    original = trainer_module.detector_step
    counter = {"n": -1}

    def step(model, batch):
        counter["n"] += 1
        if counter["n"] == 1:
            weight = next(p for n, p in model.named_parameters() if n.endswith("dense_head.cls_out.weight"))  # model: the step's wrapper
            weight.register_hook(lambda grad: grad * float("inf"))
        return original(model, batch)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", _with_step(trainer_module.Trainer.__init__, step))
    recipe = load_recipe("gfl-tiny", ["data.image_size=64", "train.batch_size=4", "student.params.fpn_channels=8", "train.epochs=1"])
    train_run(recipe, data, tmp_path / "r", show_progress=False)
    logged = [r for r in records(tmp_path / "r") if "step" in r and "val" not in r]
    assert [r.get("skipped") for r in logged] == [None, "gradients", "gradients"]  # the hook stays on the tensor
    assert logged[1]["nonfinite_grads"] == ["dense_head.cls_out.weight"]  # "gradients": every loss term was finite
    assert "gradients (first: dense_head.cls_out.weight) not finite" in capsys.readouterr().err


def _with_step(init, step):
    def patched(self, *args, **kwargs):
        kwargs["step_fn"] = step
        init(self, *args, **kwargs)

    return patched


def test_non_finite_steps_in_a_row_stop_the_run_with_one_line(data, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 4, 5})  # epoch 2: epoch 1's checkpoint stays the last good one
    result = train(data, tmp_path / "r", "--epochs", 2)
    assert result.exit_code == 2
    line = [l for l in result.output.splitlines() if l.startswith("error:")][0]
    assert "3 steps in a row were not finite" in line and "loss_qfl" in line
    assert sum(l.startswith("warning:") for l in result.output.splitlines()) == 2
    _, meta = read_checkpoint(tmp_path / "r" / "checkpoints" / "last.safetensors")
    assert meta["step"] == 3  # end of epoch 1


def test_diverged_weights_are_never_saved(data, tmp_path, monkeypatch):
    """The bad update is the epoch's last step and the loss was finite: the weight check catches it."""
    original = torch.optim.AdamW.step

    def exploding(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", exploding)
    line = one_error_line(train(data, tmp_path / "r", "--epochs", 1))
    assert "weights are not finite after step 3" in line and "nothing saved" in line
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "train_state.safetensors").exists()


# ------------------------------------------------------------------------------ disk and kills
def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert train(data, out, "--epochs", 1).exit_code == 0
    before = (out / "checkpoints" / "last.safetensors").read_bytes(), (out / "train_state.safetensors").read_bytes()
    real = os.fsync

    def full(fd):  # a full disk shows when the checkpoint's temporary file is flushed
        if ".safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    line = one_error_line(invoke("train", "--resume", out, "--epochs", 2, "--no-progress"))
    assert "No space left on device" in line and "previous file" in line
    assert ((out / "checkpoints" / "last.safetensors").read_bytes(), (out / "train_state.safetensors").read_bytes()) == before
    assert not list(out.rglob("*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_one_line(data, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "cannot write" in one_error_line(train(data, folder / "r", "--epochs", 1))
    finally:
        folder.chmod(0o700)


def test_a_kill_during_the_first_save_leaves_a_folder_both_resume_and_a_fresh_run_accept(run, data, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    (killed / "train_state.safetensors").unlink()  # killed before the first state was renamed
    shutil.rmtree(killed / "checkpoints")
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / ".best.safetensors.abc.tmp").write_bytes(b"half")
    fresh = tmp_path / "fresh"
    shutil.copytree(killed, fresh)
    result = invoke("train", "--resume", killed, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "no step was saved" in result.output
    assert train(data, fresh, "--epochs", 1).exit_code == 0
    for folder in (killed, fresh):
        assert not list(folder.rglob("*.tmp"))
        assert [r["step"] for r in records(folder) if "loss" in r] == [0, 1, 2]
    a, b = load_file(str(killed / "checkpoints/last.safetensors")), load_file(str(run / "checkpoints/last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_state_and_last_checkpoint_is_repaired_on_resume(run, tmp_path):
    """The state (step 3) is newer than last (an older copy): resume rewrites last from the state."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    state = load_file(str(copy / "train_state.safetensors"))
    model_keys = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    _, meta = read_checkpoint(copy / "checkpoints" / "last.safetensors")
    meta = {**meta, "step": 0}
    from safetensors.torch import save_file

    save_file({k: v.clone() * 0 for k, v in model_keys.items()}, str(copy / "checkpoints/last.safetensors"), metadata={"detkd": json.dumps(meta)})
    (copy / "checkpoints/last.json").write_text(json.dumps(meta))
    result = invoke("train", "--resume", copy, "--no-progress")
    assert result.exit_code == 0, result.output
    repaired, meta = read_checkpoint(copy / "checkpoints" / "last.safetensors")
    assert meta["step"] == 3 and all(torch.equal(repaired[k], model_keys[k]) for k in model_keys)


# --------------------------------------------------------------------------------------- resume
def test_resuming_a_finished_run_keeps_its_summary(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "summary.json").read_text(), (copy / "metrics.jsonl").read_text()
    result = invoke("train", "--resume", copy, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "already trained for 1 epochs" in result.output
    assert ((copy / "summary.json").read_text(), (copy / "metrics.jsonl").read_text()) == before
    assert json.loads(before[0])["final"]


def test_resume_from_another_directory_with_a_relative_data_path(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    out = tmp_path / "rel"
    assert invoke("train", "gfl-tiny", "--data", data.name, "--out", out, "--epochs", 1, *SMALL).exit_code == 0
    assert json.loads((out / "run.json").read_text())["data"] == str(data.resolve())
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--resume", out, "--epochs", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(6))  # no step logged twice


def test_distill_resume_remembers_force(run, data, tmp_path):
    out = tmp_path / "d"
    args = ["--set", "data.image_size=64", "--set", "train.batch_size=4", "--no-progress"]
    result = invoke("distill", "ld-tiny", "--teacher", run, "--data", data, "--out", out, "--epochs", 1, "--force", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["teacher"]["force"] is True
    result = invoke("distill", "--resume", out, "--epochs", 2, "--no-progress")  # the teacher is still below min_ap
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# ----------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_loads_from_its_own_tensors_alone(run, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    real = timm.create_model

    def offline(*args, **kwargs):  # 'timm' must never reach the network
        assert not kwargs.get("pretrained"), "pretrained weights requested while loading a checkpoint"
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    state, meta = read_checkpoint(run / "checkpoints" / "best.safetensors")
    for source in ("/nowhere/backbone.pth", "timm"):
        meta["student"]["params"]["pretrained"] = source
        path = tmp_path / "self-contained.safetensors"
        save_file(state, str(path), metadata={"detkd": json.dumps(meta)})
        loaded, _ = load_detector(path)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_no_weight_reader_unpickles(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    from teachers import load_teacher

    for read in (read_checkpoint, load_detector, load_teacher, lambda p: load_train_state(p, optimizer, {})):
        with pytest.raises(CheckpointError):
            read(evil)


def test_a_train_state_with_nan_is_refused(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    state = load_file(str(copy / "train_state.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(copy / "train_state.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    key = next(k for k in state if k.startswith("model.") and state[k].is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, str(copy / "train_state.safetensors"), metadata=metadata)
    assert "holds NaN or inf" in one_error_line(invoke("train", "--resume", copy, "--epochs", 2, "--no-progress"))


# -------------------------------------------------------------------------------- device and AMP
def test_bf16_autocast_trains_on_the_cpu(data, tmp_path):
    result = train(data, tmp_path / "bf16", "--epochs", 1, "--amp", "bf16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["amp"] == "bf16" and summary["device"] == "cpu"
    steps = [r for r in records(tmp_path / "bf16") if "val" not in r]
    # Every step either trained with a finite loss or was skipped by the non-finite guard: on a CPU
    # with native bf16 kernels one early step's gradients were once not finite (step 2 of 3; not
    # reproducible on the AMD EPYC with avx512_bf16 nor with oneDNN capped at AVX2 / AVX-512). bf16
    # has fp32's range, so that is a bug somewhere; a skipped step's record names the tensors whose
    # gradients were not finite (``nonfinite_grads``) so that the machine that meets it says where.
    trained = [r for r in steps if "skipped" not in r]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in trained)
    assert all(r["skipped"] == "gradients" for r in steps if "skipped" in r)
    assert len(trained) >= len(steps) - 1 >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_training_and_distillation(amp, run, data, tmp_path):
    result = train(data, tmp_path / "t", "--epochs", 1, "--device", "cuda", "--amp", amp)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_memory_mb"] > 0
    result = invoke("distill", "ld-tiny", "--teacher", run, "--data", data, "--out", tmp_path / "d", "--epochs", 1, "--force",
                    "--device", "cuda", "--amp", amp, "--set", "data.image_size=64", "--set", "train.batch_size=4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert invoke("eval", tmp_path / "d", "--data", data, "--device", "cuda", "--no-progress").exit_code == 0


@pytest.mark.parametrize("target", ["mkdir", "mkstemp"])
def test_a_read_only_file_system_is_one_line(target, data, tmp_path, monkeypatch):
    """Simulated (the tests may run as root, which ignores permissions): EROFS from the OS."""
    import pathlib
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    if target == "mkdir":
        real = pathlib.Path.mkdir
        monkeypatch.setattr(pathlib.Path, "mkdir", lambda self, *a, **k: refuse() if "ro-run" in str(self) else real(self, *a, **k))
    else:
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    line = one_error_line(train(data, tmp_path / "ro-run", "--epochs", 1))
    assert "Read-only file system" in line and "ro-run" in line
