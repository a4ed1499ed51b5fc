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
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as serialize
from torch import nn

from distill.errors import CheckpointError, OutputError

FORMAT = "detkd-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file in the target folder, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one. The temporary name is
    always ``.NAME.XXXXXXXX.tmp`` (chosen here, never by a library), so that
    :func:`remove_temp_files` knows every file a kill can leave. A full disk or a read-only folder
    is one :class:`OutputError` line naming ``path``, the space needed (``size`` bytes, when
    known) and what is kept.
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
    except (OSError, SafetensorError) as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(write_failure(path, exc, size)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_failure(path: Path, exc: BaseException, size: int | None = None) -> str:
    """``PATH: cannot write (REASON; needs N MB, M MB free); WHAT IS KEPT`` for a failed write."""
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    if size is not None:
        folder = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), None)
        free = shutil.disk_usage(folder).free if folder is not None else None
        reason += f"; needs {_readable_size(size)}" + (f", {_readable_size(free)} free" if free is not None else "")
    kept = "the previous file is kept" if path.is_file() else "nothing was written"
    return f"{path}: cannot write ({reason}); {kept}"


def _readable_size(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``data`` to ``path`` atomically (``mode``: permissions, e.g. 0o644; mkstemp makes 0600)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        if mode is not None:
            os.chmod(tmp, mode)

    atomic_write(path, write, size=len(data))


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file, serialised in memory and written by :func:`atomic_write_bytes`.

    ``safetensors.torch.save_file`` writes through a temporary of its own (``.tmpXXXXXX``) that a
    kill leaves behind under a name detkd cannot tell from a user's file; serialising to bytes
    keeps every temporary under detkd's name.
    """
    atomic_write_bytes(path, serialize(tensors, metadata=metadata))


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
        reason = write_failure(path, exc, len(line.encode())).rsplit("; ", 1)[0]  # without "what is kept"
        raise OutputError(f"{reason}; the lines before are kept (a cut last line is dropped on resume)") from None


# safetensors' own temporary (``tempfile`` crate: ".tmp" + 6 characters), left by kills of
# detkd versions that wrote through ``save_file``
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` leftovers of writes a kill interrupted; returns what was removed."""
    removed = []
    for tmp in Path(folder).iterdir():
        if tmp.is_file() and (tmp.name.startswith(".") and tmp.name.endswith(".tmp") or _LIBRARY_TEMP.fullmatch(tmp.name)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clones also detach and make contiguous.
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = json.dumps(meta, sort_keys=True)
    state = _plain_state(model)
    save_safetensors(Path(path), state, {"detkd": text})
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
    save_safetensors(Path(path), tensors, {"detkd_train_state": json.dumps(meta)})


def read_train_state_info(path: Path) -> dict[str, Any] | None:
    """The position (epoch, step, ...) a training state holds, from its header alone; None if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["detkd_train_state"])["info"]
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError, ValueError):
        return None


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
