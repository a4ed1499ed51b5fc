"""Checkpoints as safetensors with JSON metadata, written atomically, loaded without pickle.

A model checkpoint is one ``.safetensors`` file: the detector's state dict plus a ``detkd`` metadata
entry (JSON: how to rebuild the detector, class names, recipe, step, metrics). A ``.json`` sidecar
with the same metadata is written next to it for people and tools; the safetensors file is the
source of truth. The training state for ``--resume`` (optimizer, schedule position, trainable
distillation adapters) lives in a separate ``train_state.safetensors`` so that the model file stays
exactly what ships.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from distill.errors import CheckpointError

FORMAT = "detkd-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the target folder, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clones also detach and make contiguous.
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = json.dumps(meta, sort_keys=True)
    state = _plain_state(model)
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata={"detkd": text}))
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its best checkpoint, else its last)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: run folder has no checkpoints/best.safetensors or checkpoints/last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state dict, metadata). Raises CheckpointError for anything but a detkd checkpoint."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("detkd")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file has no 'detkd' metadata; not a detkd checkpoint")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt 'detkd' metadata ({exc.msg})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("student", "classes"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}'")
    return state, meta


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector from a checkpoint. Returns (model in eval mode, metadata)."""
    from students import create_student

    state, meta = read_checkpoint(path)
    spec = meta["student"]
    model = create_student(spec["name"], **spec.get("params", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{resolve_checkpoint(path)}: weights do not fit {spec['name']} "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    return model.eval(), meta


# --------------------------------------------------------------------------------------------
# Training state for --resume


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module], info: dict[str, Any]) -> None:
    """Optimizer tensors + trainable extra modules (e.g. feature adapters) + JSON info, atomically."""
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalar_state: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalar_state.setdefault(str(idx), {})[key] = value
    for name, module in extra.items():
        for key, value in _plain_state(module).items():
            tensors[f"extra.{name}.{key}"] = value
    meta = {"param_groups": opt["param_groups"], "scalar_state": scalar_state, "info": info}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"detkd_train_state": json.dumps(meta)}))


def load_train_state(path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module]) -> dict[str, Any]:
    """Restore what ``save_train_state`` wrote; returns the info dict (epoch, step, ...)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["detkd_train_state"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable training state ({exc})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in meta["scalar_state"].items():
        state.setdefault(int(idx), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for name, module in extra.items():
        prefix = f"extra.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return meta["info"]
