"""Checkpoints: safetensors + JSON metadata, atomic writes, no pickle, exact training-state resume."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distill.checkpoint import (
    atomic_write,
    load_train_state,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    save_train_state,
)
from distill.errors import CheckpointError

META = {"student": {"name": "toy", "params": {}}, "classes": ["a", "b"], "step": 7}


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_roundtrip_keeps_tensors_and_metadata(tmp_path):
    model = toy()
    path = tmp_path / "ckpt" / "last.safetensors"
    save_checkpoint(path, model, META)
    state, meta = read_checkpoint(path)
    assert meta["classes"] == ["a", "b"] and meta["step"] == 7 and meta["format"] == "detkd-checkpoint"
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == meta
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.json", "last.safetensors"]  # no temp files left


def test_run_folder_resolves_to_best_then_last(tmp_path):
    save_checkpoint(tmp_path / "checkpoints" / "last.safetensors", toy(), META)
    assert resolve_checkpoint(tmp_path).name == "last.safetensors"
    save_checkpoint(tmp_path / "checkpoints" / "best.safetensors", toy(), META)
    assert resolve_checkpoint(tmp_path).name == "best.safetensors"
    with pytest.raises(CheckpointError, match="no checkpoints/best.safetensors"):
        resolve_checkpoint(tmp_path / "checkpoints")


def test_pickle_file_is_refused_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled!",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        read_checkpoint(path)


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, toy(), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors: not a readable"):
        read_checkpoint(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no 'detkd' metadata"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_train_state_resume_continues_exactly(tmp_path):
    """Two AdamW steps in one go == one step, save, restore into fresh objects, one more step."""

    def step(model, opt, extra):
        opt.zero_grad()
        loss = (model(torch.ones(1, 3, 5, 5)).sum() + extra(torch.ones(1, 2)).sum()) ** 2
        loss.backward()
        opt.step()

    def make():
        model, extra = toy(), nn.Linear(2, 2)
        opt = torch.optim.AdamW(list(model.parameters()) + list(extra.parameters()), lr=0.01)
        return model, extra, opt

    ref_model, ref_extra, ref_opt = make()
    step(ref_model, ref_opt, ref_extra)
    step(ref_model, ref_opt, ref_extra)

    model, extra, opt = make()
    step(model, opt, extra)
    save_checkpoint(tmp_path / "last.safetensors", model, META)
    save_train_state(tmp_path / "state.safetensors", opt, {"adapter": extra}, {"epoch": 0, "step": 1})

    model2, extra2, opt2 = make()
    state, _ = read_checkpoint(tmp_path / "last.safetensors")
    model2.load_state_dict(state)
    info = load_train_state(tmp_path / "state.safetensors", opt2, {"adapter": extra2})
    assert info == {"epoch": 0, "step": 1}
    step(model2, opt2, extra2)
    for a, b in zip(ref_model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(ref_extra.weight, extra2.weight)
