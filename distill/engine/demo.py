"""The product on the embedded data: a teacher, the student trained alone, the student distilled.

``run_demo`` is what ``detkd demo`` runs::

    OUT/data/        generated scenes (COCO)
    OUT/teacher/     the distill recipe's teacher recipe, trained
    OUT/baseline/    the recipe's student trained alone (same architecture, data and schedule)
    OUT/distilled/   the same student distilled from the teacher with the recipe's losses
    OUT/demo.json    teacher / baseline / distilled metrics and the share of the gap closed

Each stage is skipped when its run folder already has a ``summary.json`` and resumed when it was
interrupted, so running the demo again continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write_text
from distill.config import Recipe
from distill.errors import ConfigError


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The distill recipe's student trained alone: same architecture, data and schedule, no teacher."""
    return dataclasses.replace(recipe, name=f"{recipe.name}-baseline", kind="student", teacher=None, losses=[])


def finished(run: Path) -> dict[str, Any] | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def interrupted(run: Path) -> bool:
    return (run / "train_state.safetensors").is_file()


def gap_closed(teacher_ap: float, baseline_ap: float, distilled_ap: float) -> float | None:
    """(distilled - baseline) / (teacher - baseline); None when the teacher is not better."""
    return (distilled_ap - baseline_ap) / (teacher_ap - baseline_ap) if teacher_ap > baseline_ap else None


def run_demo(
    out: Path,
    recipe: Recipe,
    teacher_recipe: Recipe,
    num_train: int,
    num_val: int,
    seed: int,
    force: bool = False,
    show_progress: bool = True,
    device: str | None = "cpu",
    amp: str | None = "off",
) -> dict[str, Any]:
    """Generate data, train teacher and baseline, distill; returns what ``OUT/demo.json`` holds."""
    from distill.data import generate_scenes
    from distill.engine.run import distill_run, train_run

    if recipe.kind != "distill":
        raise ConfigError(f"detkd demo: recipe {recipe.name} is a {recipe.kind} recipe; the demo needs a distill recipe")
    if teacher_recipe.data.image_size != recipe.data.image_size:
        raise ConfigError(
            f"detkd demo: teacher recipe {teacher_recipe.name} trains at {teacher_recipe.data.image_size} px, "
            f"recipe {recipe.name} at {recipe.data.image_size} px; the demo generates one image size"
        )
    out = Path(out)
    data = out / "data"
    if not (data / "val.json").is_file():
        generate_scenes(data, num_train=num_train, num_val=num_val, size=recipe.data.image_size, seed=seed)
    stages = {
        "teacher": lambda run, resume: train_run(teacher_recipe, data, run, resume=resume, show_progress=show_progress, device=device, amp=amp),
        "baseline": lambda run, resume: train_run(baseline_recipe(recipe), data, run, resume=resume, show_progress=show_progress, device=device, amp=amp),
        "distilled": lambda run, resume: distill_run(
            recipe, out / "teacher", data, run, force=force, resume=resume, show_progress=show_progress, device=device, amp=amp
        ),
    }
    summaries = {}
    for name, stage in stages.items():
        run = out / name
        if finished(run) is None:
            stage(run, interrupted(run))
        summaries[name] = finished(run)
    final = {name: summary["final"] for name, summary in summaries.items()}
    result = {
        "recipe": recipe.name,
        "teacher_recipe": teacher_recipe.name,
        "data": {"train": num_train, "val": num_val, "size": recipe.data.image_size, "seed": seed},
        "final": final,
        "seconds": {name: summary["seconds"] for name, summary in summaries.items()},
        "gap_closed": gap_closed(final["teacher"]["AP"], final["baseline"]["AP"], final["distilled"]["AP"]),
    }
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
