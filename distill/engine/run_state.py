"""What a run folder holds between processes: resume point, metrics log, leftovers of a kill.

``train_state.safetensors`` is the single source of truth for ``--resume``: it holds the student's
weights, the optimizer, the adapters and the position (epoch, step, best AP) of one step, written
atomically. ``checkpoints/last.safetensors`` is what ships; when a kill left it behind the state
(killed between the two renames) it is rewritten from the state on resume.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write_text, remove_temp_files
from distill.errors import CheckpointError

STATE = "train_state.safetensors"


def has_saved_step(out: Path) -> bool:
    """True when ``out`` holds a resumable step (a complete training state)."""
    return (Path(out) / STATE).is_file()


def clean_leftovers(out: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes in the run folder and its checkpoints."""
    out = Path(out)
    removed = remove_temp_files(out) if out.is_dir() else []
    if (out / "checkpoints").is_dir():
        removed += remove_temp_files(out / "checkpoints")
    return removed


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is lost with it
    return records


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the records up to the resumed ``step`` so that re-run steps are not logged twice.

    Step records carry the 0-based index of the step; evaluation records the number of steps done.
    """
    kept = [r for r in read_metrics(out) if (r["step"] <= step if "val" in r else r["step"] < step)]
    atomic_write_text(Path(out) / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def read_summary(out: Path) -> dict[str, Any] | None:
    path = Path(out) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupt summary (not JSON)") from None
