"""Reading a user's teacher files safely: weights without unpickling code, class-name tables.

A ``.pth`` / ``.pt`` file is read with ``torch.load(weights_only=True)``: only tensors and plain
containers; a pickle that names any other global (a payload) is refused, never run. ``.safetensors``
files are read with safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import Tensor

from distill.errors import CheckpointError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (.safetensors, or a torch file of tensors only).

    Accepts ``model.state_dict()`` saved directly, or wrapped as ``{"model": state_dict}`` (torchvision's
    reference scripts). Raises CheckpointError (one line) for a missing file, a pickle that needs
    arbitrary objects, or anything that is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: teacher weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for a payload, RuntimeError / EOFError for junk
            raise CheckpointError(
                f"{path}: refused to load: not a plain tensor file (weights_only loading failed: {_first_line(exc)}); "
                "save the weights with torch.save(model.state_dict(), path) or safetensors"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def read_class_names(path: str | Path) -> dict[int, str]:
    """Teacher label id -> class name, from a JSON or YAML file.

    The file holds either a list (entry i names label i) or a mapping ``{label id: name}`` (labels not
    listed have no name and are never matched to a dataset class).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: teacher class-name file not found")
    try:
        table = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a JSON / YAML class-name table ({_first_line(exc)})") from None
    if isinstance(table, list) and all(isinstance(n, str) for n in table):
        return dict(enumerate(table))
    if isinstance(table, dict) and all(str(k).lstrip("-").isdigit() and isinstance(v, str) for k, v in table.items()):
        return {int(k): v for k, v in table.items()}
    raise CheckpointError(f"{path}: a class-name table must be a list of names or a mapping of label id -> name")


def column_names(label_names: dict[int, str], labels: list[int]) -> list[str]:
    """Names of the output columns ``labels`` (teacher label ids); an unnamed label gets its id as a
    string (so ``teacher.class_map`` can still map a dataset class to it: ``{circle: "3"}``)."""
    return [label_names.get(i, str(i)) for i in labels]
