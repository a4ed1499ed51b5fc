"""Rows of ``detkd compare``: what each run folder's summary.json, run.json and checkpoint say.

``gap closed`` = (AP_run - AP_baseline) / (AP_teacher - AP_baseline): the fraction of the
baseline-to-teacher AP gap a distilled student closes (0: no better than the student trained alone,
1: as good as the teacher). Undefined ("-") when the teacher is not above the baseline. AP values
are each run's final evaluation (``summary.json`` ``final``). Export size: the run's
``export/student.onnx`` (``detkd export``'s default), "-" when the run has none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import CheckpointError, ConfigError

METRICS = ("AP", "AP50", "AP75", "AR100")
COLUMNS = ("recipe", "teacher", *METRICS, "gap closed", "train s", "images/s", "params", "export MB")


@dataclass
class RunRecord:
    """What compare reads of one run folder."""

    path: Path
    summary: dict[str, Any]
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ap(self) -> float | None:
        value = (self.summary.get("final") or {}).get("AP")
        return float(value) if isinstance(value, (int, float)) else None


def read_record(run: Path) -> RunRecord:
    """A finished run folder; ConfigError (one line naming it) for anything else."""
    from distill.engine.run import read_run_info
    from distill.engine.run_state import read_summary

    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: is a file, not a run folder" if run.exists() else f"{run}: run folder not found")
    info = read_run_info(run)
    summary = read_summary(run)
    if summary is None:
        raise ConfigError(f"{run}: the run has no summary.json (still running, or stopped before its end?)")
    if not isinstance(summary, dict):
        raise CheckpointError(f"{run / 'summary.json'}: corrupt summary (not an object)")
    return RunRecord(run, summary, info)


def gap_closed(ap: float | None, baseline: float | None, teacher: float | None) -> float | None:
    """(ap - baseline) / (teacher - baseline); None when a value is missing or teacher <= baseline."""
    if ap is None or baseline is None or teacher is None or teacher <= baseline:
        return None
    return (ap - baseline) / (teacher - baseline)


def count_parameters(run: Path) -> int | None:
    """Parameters of the run's shipped student (its best checkpoint, else last); None without one."""
    from students.saved import load_detector

    try:
        model, _ = load_detector(run)
    except CheckpointError:
        return None
    return sum(p.numel() for p in model.parameters())


def teacher_name(info: dict[str, Any]) -> str | None:
    """The teacher's run folder name (a distill run records its checkpoint path)."""
    teacher = info.get("teacher")
    if not isinstance(teacher, dict) or not isinstance(teacher.get("path"), str):
        return None
    path = Path(teacher["path"])
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def recorded_teacher_ap(info: dict[str, Any]) -> float | None:
    """The teacher's val AP the distill run measured when it started."""
    teacher = info.get("teacher")
    value = ((teacher or {}).get("val") or {}).get("AP") if isinstance(teacher, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def export_mb(run: Path) -> float | None:
    """Size in MB of the run's ``export/student.onnx`` (where ``detkd export RUN`` writes), else None."""
    path = Path(run) / "export" / "student.onnx"
    return path.stat().st_size / 1e6 if path.is_file() else None


def compare_rows(records: list[RunRecord], baseline: RunRecord | None, teacher: RunRecord | None) -> list[dict[str, Any]]:
    """One row per run: recipe, teacher, metrics, gap closed, time, speed, parameters, export size.

    The gap is measured against ``baseline``'s AP and ``teacher``'s AP; without ``teacher``, a
    distilled run's own record of its teacher's val AP.
    """
    base_ap = baseline.ap if baseline is not None else None
    rows = []
    for record in records:
        final = record.summary.get("final") or {}
        teacher_ap = teacher.ap if teacher is not None else recorded_teacher_ap(record.info)
        role = "baseline" if baseline is not None and record.path.resolve() == baseline.path.resolve() else (
            "teacher" if teacher is not None and record.path.resolve() == teacher.path.resolve() else None)
        rows.append({
            "run": record.name,
            "path": str(record.path),
            "role": role,
            "kind": record.info.get("kind"),
            "recipe": record.summary.get("recipe"),
            "teacher": teacher_name(record.info),
            **{m: final.get(m) for m in METRICS},
            "gap closed": gap_closed(record.ap, base_ap, teacher_ap),
            "train s": record.summary.get("train_seconds", record.summary.get("seconds")),
            "images/s": record.summary.get("steady_images_per_s", record.summary.get("images_per_s")),
            "params": count_parameters(record.path),
            "export MB": export_mb(record.path),
        })
    return rows


def rows_json(rows: list[dict[str, Any]], baseline: RunRecord | None, teacher: RunRecord | None) -> str:
    record = {
        "baseline": str(baseline.path) if baseline else None,
        "teacher": str(teacher.path) if teacher else None,
        "gap_closed": "(AP - AP_baseline) / (AP_teacher - AP_baseline)",
        "runs": rows,
    }
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def is_compare_record(path: Path) -> bool:
    """Whether ``path`` is what ``detkd compare --json`` writes (so a new comparison may replace it)."""
    from distill.outputs import read_json

    record = read_json(path)
    return isinstance(record, dict) and {"runs", "gap_closed"} <= record.keys()
