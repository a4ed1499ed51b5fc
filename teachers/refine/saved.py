"""A refined run on disk: the refiner's weights alone, the detector referenced and fingerprinted.

The run's checkpoints (``RUN/checkpoints/{best,last}.safetensors``, written by the trainer) hold
the refiner's state dict; their ``detkd`` metadata carries the detector's ``student`` / ``classes``
/ ``image_size`` (so every reader of a checkpoint sees the detector it refines) and a ``refine``
entry::

    {"detector": "/abs/path/best.safetensors", "sha256": "...", "family": "sparse",
     "params": {"steps": 3, "top_k": 100, "channels": 64, ...}, "parameters": 431_000,
     "box_targets": "refined: ..."}

``load_refined`` rebuilds the detector from that path only if its sha256 is unchanged: a refiner
trained on other weights would move boxes by what it learned about those.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import CheckpointError, ConfigError
from teachers.cache_format import file_sha256
from teachers.refine.model import RefinedDetector
from teachers.refine.refiner import REFINER_DEFAULTS, BoxRefiner

# The refiner's settings (``student.params`` of a refine recipe) and their defaults.
PARAMS = {"steps": 3, "top_k": 100, **REFINER_DEFAULTS}
_INTS = ("steps", "top_k", "channels", "hidden", "blocks", "mlp_layers", "roi_size")


def check_params(params: dict[str, Any], source: str) -> dict[str, Any]:
    """The refiner's params with defaults filled; one line naming ``student.params.KEY`` otherwise."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ConfigError(f"{source}: 'student.params.{unknown[0]}' is not a refiner setting (known: {', '.join(PARAMS)})")
    out = {**PARAMS, **params}
    if out["hidden"] is None:
        out["hidden"] = out["channels"]  # the reference's bottlenecks: as wide inside as outside
    for key in _INTS:
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "mlp_layers" else 1):
            raise ConfigError(f"{source}: 'student.params.{key}' must be an integer >= {0 if key == 'mlp_layers' else 1}, got {value!r}")
    if not isinstance(out["canonical_size"], (int, float)) or not out["canonical_size"] > 0:
        raise ConfigError(f"{source}: 'student.params.canonical_size' must be > 0, got {out['canonical_size']!r}")
    out["canonical_size"] = float(out["canonical_size"])
    return out


def build_refined(detector: nn.Module, params: dict[str, Any]) -> RefinedDetector:
    """A fresh refiner (its FPN's input channels read off the detector's maps) on ``detector``."""
    channels = _feature_channels(detector)
    refiner = BoxRefiner(
        channels, detector.spec.strides, params["channels"], params["hidden"], params["blocks"], params["mlp_layers"], params["roi_size"],
        params["canonical_size"],
    )
    dtype = next(detector.parameters()).dtype
    return RefinedDetector(detector, refiner.to(dtype), params["steps"], params["top_k"])


def _feature_channels(detector: nn.Module) -> list[int]:
    spec = detector.spec
    if spec.fpn_channels is not None:
        return [spec.fpn_channels] * len(spec.strides)
    # Maps of several widths: one forward on a small canvas reads them.
    side = max(spec.strides) * 2
    param = next(detector.parameters())
    with torch.no_grad():
        maps = detector.features(torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device))
    return [int(m.shape[1]) for m in maps]


def load_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[RefinedDetector, dict[str, Any]]:
    """The refined detector a checkpoint describes (its detector loaded from the referenced path)."""
    from students.saved import load_detector

    info = meta["refine"]
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("detector", "sha256")):
        raise CheckpointError(f"{path}: metadata 'refine' must name the detector and its sha256")
    detector_path = Path(info["detector"])
    if not detector_path.is_file():
        raise CheckpointError(f"{path}: the detector it refines, {detector_path}, is missing")
    digest = file_sha256(detector_path)
    if digest != info["sha256"]:
        raise CheckpointError(
            f"{path}: the detector {detector_path} changed since this refiner was trained (sha256 {digest[:12]}, "
            f"expected {info['sha256'][:12]}); train a refiner for it with detkd refine"
        )
    detector, _ = load_detector(detector_path)
    if isinstance(detector, RefinedDetector):
        raise CheckpointError(f"{path}: refines {detector_path}, itself a refined run; refine the detector instead")
    try:
        params = check_params(dict(info.get("params") or {}), str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    model = build_refined(detector, params)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: refiner weights do not fit the metadata's settings ({str(exc).splitlines()[0]})") from None
    return model.eval(), meta
