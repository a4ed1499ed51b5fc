"""Saved detectors: rebuild a trained detector from a detkd checkpoint (``load_detector``).

``distill.checkpoint`` is the file format (atomic safetensors with detkd metadata) and imports no
detector; building one from a checkpoint's ``student`` entry (a registered name and its parameters)
belongs here, with the detectors. The teachers and the engine call this.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from distill.checkpoint import read_checkpoint, resolve_checkpoint
from distill.errors import CheckpointError, DetkdError
from students.registry import create_student

# Checkpoints of a model built around another checkpoint, by the metadata key that marks them, and
# the module whose ``load_checkpoint(path, state, meta)`` rebuilds it: "refine", a `detkd refine`
# run (the refiner's weights; its detector referenced by path and sha256). Named, not imported: that
# module sits above the detectors (it imports this one) and is loaded only when such a checkpoint is read.
COMPOSITE_LOADERS = {"refine": "teachers.refine.saved"}


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector from a checkpoint. Returns (model in eval mode, metadata)."""
    path = resolve_checkpoint(path)
    state, meta = read_checkpoint(path)
    for key, module in COMPOSITE_LOADERS.items():
        if key in meta:
            return importlib.import_module(module).load_checkpoint(path, state, meta)
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
