"""Checkpoints as safetensors with JSON metadata, written atomically, loaded without pickle.

A model checkpoint is one ``.safetensors`` file: the detector's state dict plus a ``detkd`` metadata
entry (JSON: how to rebuild the detector, class names, recipe, step, metrics). A ``.json`` sidecar
with the same metadata is written next to it for people and tools; the safetensors file is the
source of truth. The training state for ``--resume`` (optimizer, schedule position, trainable
distillation adapters) lives in a separate ``train_state.safetensors`` so that the model file stays
exactly what ships. The training state also holds the student's weights: it is the one file
``--resume`` reads, so weights, optimizer and position always come from the same step (a kill
between two files can never pair a new checkpoint with an old state).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from distill.errors import CheckpointError, OutputError

FORMAT = "detkd-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the target folder, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    A full disk or a read-only folder is one :class:`OutputError` line naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        if os.environ.get("DETKD_TEST_SAVE_PAUSE"):  # test hook: widens the window a kill test aims at
            time.sleep(float(os.environ["DETKD_TEST_SAVE_PAUSE"]))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); the previous file, if any, is kept") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def make_dir(path: Path) -> Path:
    """``mkdir -p`` with a read-only or full disk reported as one :class:`OutputError` line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder ({exc.strerror or exc})") from None
    return Path(path)


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics log); a full disk is one :class:`OutputError` line."""
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` leftovers of writes a kill interrupted; returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


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
    check_finite(state, path)
    return state, meta


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or inf (a diverged run must never be shipped or taught from)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: tensor '{key}' holds NaN or inf; the run diverged, use an earlier checkpoint")


def require_meta(meta: dict[str, Any], path: str | Path, *keys: str) -> None:
    for key in keys:
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}' (not written by detkd train / distill?)")


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector from a checkpoint. Returns (model in eval mode, metadata)."""
    from students import create_student

    from distill.errors import DetkdError

    path = resolve_checkpoint(path)
    state, meta = read_checkpoint(path)
    spec = meta["student"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("params", {}), dict):
        raise CheckpointError(f"{path}: metadata 'student' must map a name and params")
    # Self-contained: every weight comes from this file, so the backbone's pretrained source (a
    # path, 'timm' = the network) is never read again; resolved modes (norm_eval) stay in params.
    params = {**spec.get("params", {}), "pretrained": None} if "pretrained" in spec.get("params", {}) else dict(spec.get("params", {}))
    try:
        model = create_student(spec["name"], **params)
    except DetkdError as exc:
        raise CheckpointError(f"{path}: metadata does not describe a buildable detector ({exc})") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: metadata does not describe a buildable detector ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes (another FPN width or backbone)
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise CheckpointError(f"{path}: weights do not fit the metadata's {spec['name']} ({first})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {spec['name']} "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    return model.eval(), meta


# --------------------------------------------------------------------------------------------
# Training state for --resume


def save_train_state(
    path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module], info: dict[str, Any], model: nn.Module | None = None
) -> None:
    """Optimizer tensors + trainable extra modules (e.g. feature adapters) + JSON info, atomically;
    with ``model``, its weights too (``model.*``), so that one file restores a whole step."""
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
    if model is not None:
        tensors.update({f"model.{k}": v for k, v in _plain_state(model).items()})
    meta = {"param_groups": opt["param_groups"], "scalar_state": scalar_state, "info": info}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"detkd_train_state": json.dumps(meta)}))


def load_train_state(
    path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module], model: nn.Module | None = None
) -> dict[str, Any]:
    """Restore what ``save_train_state`` wrote; returns the info dict (epoch, step, ...).

    With ``model``, the state must hold its weights (written with ``model=``) and they are loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["detkd_train_state"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable training state ({exc})") from None
    check_finite(tensors, path)
    if model is not None:
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if not weights:
            raise CheckpointError(f"{path}: training state holds no model weights (written by an older detkd); resume is not possible")
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights in the training state do not fit the run's detector ({str(exc).splitlines()[0]})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in meta["scalar_state"].items():
        state.setdefault(int(idx), {}).update(entries)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({exc})") from None
    for name, module in extra.items():
        prefix = f"extra.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return meta["info"]
