"""Trace a student to an ONNX file, check it, write it atomically; run it with onnxruntime.

The exporter is torch's TorchScript tracer (``dynamo=False``): it reads torchvision's ONNX symbolics
for ``nms`` and ``roi_align``. The input is the canvas ``detkd predict`` feeds the model: a square of
the checkpoint's ``image_size`` rounded up to ``size_divisor``, normalised as in training.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.errors import ConfigError
from distill.export.wrappers import OUTPUTS, RAW_OUTPUTS, export_module

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "canvas_side", "export_onnx", "is_detkd_onnx", "load_session", "run_session"]

DEFAULT_OPSET = 17
# RoIAlign with aligned=True (the half-pixel offset Sparse R-CNN samples with) has no ONNX form before
# opset 16, and GridSample (AdaMixer's 3-D sampling) first appears in 16: older opsets are refused.
MIN_OPSET = 16
META_KEY = "detkd"


def canvas_side(meta: dict[str, Any]) -> int:
    divisor = int(meta.get("size_divisor", 32))
    return math.ceil(int(meta["image_size"]) / divisor) * divisor


def max_opset() -> int:
    """The newest opset torch's TorchScript exporter writes (checked first: its own refusal dumps the
    whole traced graph to the terminal)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return DEFAULT_OPSET


def _exp2(g, x):
    """aten::exp2 (AdaMixer's box scale 2^z) as Pow(2, x): torch.onnx has no symbolic for it."""
    return g.op("Pow", g.op("Constant", value_t=torch.tensor(2.0)), x)


def _register_symbolics() -> None:
    torch.onnx.register_custom_op_symbolic("aten::exp2", _exp2, MIN_OPSET)


def _exportable(model: nn.Module) -> None:
    """Refuse, in one line, a model whose inference shapes depend on the image content."""
    source = (model.config.get("params") or {}).get("query_source", "learned")
    if source != "learned":
        raise ConfigError(
            f"{model.config.get('name')}: query source {source!r} keeps a data-dependent number of anchors per image "
            "(score-thresholded windows over several probe stages, then a per-image count); that selection has no "
            "fixed-shape ONNX form yet: export a student with learned anchors (asag_s, sparse_rcnn6, dab_detr)"
        )


def export_onnx(
    model: nn.Module, meta: dict[str, Any], opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, raw: bool = False
) -> bytes:
    """The checked ONNX model of ``model`` (a detector from ``load_detector``) as bytes.

    ``dynamic_batch``: the batch axis is symbolic (traced at batch 1, runs at any batch); else batch 1.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: detkd exports need opset >= {MIN_OPSET} (RoIAlign aligned=True and GridSample); use the default {DEFAULT_OPSET}")
    newest = max_opset()
    if opset > newest:
        raise ConfigError(f"--opset {opset}: this torch {torch.__version__} exports opsets {MIN_OPSET} to {newest}; use the default {DEFAULT_OPSET}")
    _exportable(model)
    _register_symbolics()
    wrapper = export_module(model.cpu(), raw)
    side = canvas_side(meta)
    example = torch.zeros(1, 3, side, side)
    outputs = list(OUTPUTS) + (list(RAW_OUTPUTS[model.family]) if raw else [])
    axes = {name: {0: "batch"} for name in ["images", *outputs]} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on constant shapes (the canvas is fixed on purpose)
        try:
            torch.onnx.export(
                wrapper, (example,), buffer, dynamo=False, opset_version=opset, input_names=["images"],
                output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
            )
        except (RuntimeError, ValueError) as exc:  # e.g. an opset newer than this torch knows
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ConfigError(f"--opset {opset}: torch.onnx could not export {model.config.get('name')}: {first}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    info = {"family": model.family, "student": model.config, "image_size": meta["image_size"], "canvas": side,
            "classes": meta.get("classes"), "raw": raw, "dynamic_batch": dynamic_batch}
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(info, sort_keys=True)})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def onnx_meta(path: str | Path) -> dict[str, Any] | None:
    """The detkd record of an ONNX file this module wrote, else None (any other file, unreadable)."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return json.loads(props[META_KEY]) if META_KEY in props else None
    except Exception:  # noqa: BLE001 — anything that is not our ONNX file is "not ours"
        return None


def is_detkd_onnx(path: Path) -> bool:
    return onnx_meta(path) is not None


def load_session(path: str | Path):
    """A CPU onnxruntime session on ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor) -> dict[str, np.ndarray]:
    """images (B, 3, H, W) -> {output name: array}."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images.detach().cpu().numpy().astype(np.float32)})))
