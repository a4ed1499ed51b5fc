"""Typed option groups of the sparse detectors, and the checks every one of their parameters gets.

A registered sparse detector keeps a flat keyword signature (what recipes write under
``student.params`` and checkpoints store), but the model is built from these groups, each a frozen
dataclass whose field names are the flat keys:

- :class:`BoxHeadConfig`  ``box_head``, ``num_bins``, ``bin_fraction``
- :class:`RoIConfig`      ``roi_size``, ``roi_canonical`` (RoI-based decoders)
- :class:`LossConfig`     ``query_weighting`` and the loss weights
- :class:`PostprocessConfig` ``max_detections``, ``score_thresh``, ``nms_iou``

:func:`common_checks` holds the checks every sparse detector shares (levels, widths, heads, bins,
losses, post-processing); each detector adds its own. They return ``ParamCheck`` rows, so the
registry reports them as one line naming ``student.params.<key>`` at recipe load (before a run
folder exists) and ``create_student`` refuses the same values for API users.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from students.backbone import backbone_checks
from students.registry import ParamCheck, finite

__all__ = ["BoxHeadConfig", "RoIConfig", "LossConfig", "PostprocessConfig", "pick", "common_checks", "strides_checks"]


@dataclass(frozen=True)
class BoxHeadConfig:
    """Box head: ``"delta"`` (the decoder's own box update) or ``"bins"`` (per-edge distributions,
    ``num_bins`` per edge of width ``bin_fraction`` of the reference side; LD and DFL read them)."""

    box_head: Literal["delta", "bins"] = "delta"
    num_bins: int = 17
    bin_fraction: float = 0.125

    @property
    def bins(self) -> int | None:
        return self.num_bins if self.box_head == "bins" else None


@dataclass(frozen=True)
class RoIConfig:
    """RoIAlign ``roi_size`` x ``roi_size``; a box of side ``roi_canonical`` px reads P4."""

    roi_size: int = 7
    roi_canonical: float = 224.0


@dataclass(frozen=True)
class LossConfig:
    """Set-criterion weights (focal / L1 / GIoU / DFL), Query Weighting, and the area weight A (1 = off)."""

    query_weighting: bool = True
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dfl_weight: float = 0.25
    area_weight: float = 1.0


@dataclass(frozen=True)
class PostprocessConfig:
    max_detections: int = 100
    score_thresh: float = 0.0
    nms_iou: float | None = None


def pick(cls: type, params: dict[str, Any]) -> Any:
    """The ``cls`` group of a flat parameter mapping (its fields, by name)."""
    return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls) if f.name in params})


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strides_checks(strides: Any) -> list[ParamCheck]:
    """Levels: a non-empty, strictly increasing list of powers of two (each level halves the last)."""
    ok = (
        isinstance(strides, (list, tuple)) and len(strides) > 0 and all(_int(s) and s >= 1 and s & (s - 1) == 0 for s in strides)
        and all(a < b for a, b in zip(strides, strides[1:]))
    )
    return [ParamCheck("strides", strides, ok, "a non-empty, strictly increasing list of powers of two, e.g. [8, 16, 32]")]


def common_checks(p: dict[str, Any], width_key: str = "fpn_channels") -> list[ParamCheck]:
    """Checks every sparse detector shares; ``width_key`` names its query / feature width parameter."""
    width = p.get(width_key)
    heads = p.get("num_heads")
    rows = [
        ParamCheck("num_classes", p.get("num_classes"), _int(p.get("num_classes")) and p["num_classes"] >= 1, "an integer >= 1"),
        *strides_checks(p.get("strides")),
        ParamCheck(width_key, width, _int(width) and width >= 8 and width % 8 == 0, "a multiple of 8, >= 8"),
        ParamCheck("num_queries", p.get("num_queries"), _int(p.get("num_queries")) and p["num_queries"] >= 1, "an integer >= 1"),
        ParamCheck("groups", p.get("groups"), _int(p.get("groups")) and p["groups"] >= 1, "an integer >= 1"),
        ParamCheck("num_heads", heads, _int(heads) and heads >= 1, "an integer >= 1"),
    ]
    if rows[2].ok and rows[5].ok:
        rows.append(ParamCheck("num_heads", heads, width % heads == 0, f"a divisor of {width_key} = {width}"))
    rows.append(ParamCheck("ffn_dim", p.get("ffn_dim"), _int(p.get("ffn_dim")) and p["ffn_dim"] >= 1, "an integer >= 1"))
    rows += box_head_checks(p) + loss_checks(p) + postprocess_checks(p)
    if rows[1].ok:  # levels the backbone cannot give, an unknown model or missing weights: refused before building
        rows += backbone_checks(p)
    if "query_source" in p:
        from students.sparse.queries import query_source_checks

        rows += query_source_checks(p)
    return rows


def box_head_checks(p: dict[str, Any]) -> list[ParamCheck]:
    bins, fraction = p.get("num_bins"), p.get("bin_fraction")
    rows = [
        ParamCheck("box_head", p.get("box_head"), p.get("box_head") in ("delta", "bins"), "'delta' or 'bins'"),
        # One bin has no spread: its integral is the centre, so every edge would sit on it (a zero box).
        ParamCheck("num_bins", bins, _int(bins) and bins >= 2, "an integer >= 2"),
        ParamCheck("bin_fraction", fraction, finite(fraction) and fraction > 0, "a finite number > 0"),
    ]
    if all(r.ok for r in rows):
        # The identity box (edges at half the side) must lie inside the bins, or the head cannot start from it.
        reach = (bins - 1) * fraction
        rows.append(ParamCheck("num_bins", bins, reach > 0.5, f"large enough that (num_bins - 1) * bin_fraction > 0.5 (now {reach:g})"))
    return rows


def loss_checks(p: dict[str, Any]) -> list[ParamCheck]:
    rows = [
        ParamCheck(key, p.get(key), finite(p.get(key)) and p[key] >= 0, "a finite number >= 0")
        for key in ("cls_weight", "l1_weight", "giou_weight", "dfl_weight")
    ]
    rows.append(ParamCheck("area_weight", p.get("area_weight"), finite(p.get("area_weight")) and p["area_weight"] >= 1, "a finite number >= 1 (1 = off)"))
    return rows


def postprocess_checks(p: dict[str, Any]) -> list[ParamCheck]:
    nms = p.get("nms_iou")
    return [
        ParamCheck("max_detections", p.get("max_detections"), _int(p.get("max_detections")) and p["max_detections"] >= 1, "an integer >= 1"),
        ParamCheck("score_thresh", p.get("score_thresh"), finite(p.get("score_thresh")) and 0 <= p["score_thresh"] <= 1, "in [0, 1]"),
        ParamCheck("nms_iou", nms, nms is None or (finite(nms) and 0 < nms <= 1), "null or in (0, 1]"),
    ]


def roi_checks(p: dict[str, Any]) -> list[ParamCheck]:
    size, canonical = p.get("roi_size"), p.get("roi_canonical")
    return [
        ParamCheck("roi_size", size, _int(size) and size >= 1, "an integer >= 1"),
        ParamCheck("roi_canonical", canonical, finite(canonical) and canonical > 0, "a finite number > 0"),
    ]
