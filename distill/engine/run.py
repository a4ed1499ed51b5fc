"""Whole runs from a recipe: what ``detkd train`` and the Python API call."""
from __future__ import annotations

import json
from pathlib import Path

from distill.config import Recipe
from distill.engine.build import apply_threads, build_datasets, build_detector, run_meta
from distill.engine.checkpoint import atomic_write_text
from distill.engine.trainer import FitResult, Trainer
from distill.errors import ConfigError


def check_fresh_run_dir(out: Path) -> None:
    if (out / "checkpoints").exists() or (out / "train_state.safetensors").exists():
        raise ConfigError(f"{out}: already holds a run; pass --resume {out} to continue it, or choose another --out")


def read_run_info(run: Path) -> dict:
    path = Path(run) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{run}: not a detkd run folder (no run.json)")
    return json.loads(path.read_text())


def train_run(recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False, show_progress: bool = True) -> FitResult:
    """Train ``recipe``'s detector on ``data``; writes everything into ``out``."""
    out = Path(out)
    if not resume:
        check_fresh_run_dir(out)
    apply_threads(recipe)
    train_set, val_set = build_datasets(recipe, data)
    model = build_detector(recipe, num_classes=len(train_set.classes))
    meta = run_meta(model, train_set, recipe, data)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "run.json", json.dumps({**meta, "kind": "train"}, indent=2, sort_keys=True) + "\n")
    trainer = Trainer(model, recipe, train_set, val_set, out, meta, show_progress=show_progress)
    return trainer.fit(resume=resume)
