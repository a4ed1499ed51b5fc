"""Whole runs from a recipe: what ``detkd train`` and the Python API call."""
from __future__ import annotations

import json
from pathlib import Path

from distill.config import Recipe
from distill.engine.build import apply_threads, build_datasets, build_detector, run_meta
from distill.checkpoint import atomic_write_text
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


def prepare_run(recipe: Recipe, data: str | Path, out: str | Path, resume: bool):
    """What every run starts with: a fresh (or resumed) folder, threads, datasets, the student."""
    out = Path(out)
    if not resume:
        check_fresh_run_dir(out)
    apply_threads(recipe)
    train_set, val_set = build_datasets(recipe, data)
    model = build_detector(recipe, num_classes=len(train_set.classes))
    return out, train_set, val_set, model


def write_run_info(out: Path, meta: dict, kind: str, resume: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a resumed run keeps the run.json it started with
        atomic_write_text(out / "run.json", json.dumps({**meta, "kind": kind}, indent=2, sort_keys=True) + "\n")


def train_run(recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False, show_progress: bool = True) -> FitResult:
    """Train ``recipe``'s detector on ``data``; writes everything into ``out``."""
    out, train_set, val_set, model = prepare_run(recipe, data, out, resume)
    meta = run_meta(model, train_set, recipe, data)
    write_run_info(out, meta, "train", resume)
    trainer = Trainer(model, recipe, train_set, val_set, out, meta, show_progress=show_progress)
    return trainer.fit(resume=resume)


def build_losses(recipe: Recipe, student, teacher) -> list:
    """The recipe's distillation terms; feature adapters get their channel counts from the pair."""
    from distill.losses import create_loss, loss_parameters

    losses = []
    for i, spec in enumerate(recipe.losses):
        params = dict(spec.params)
        if "student_channels" in loss_parameters(spec.name):
            params.setdefault("student_channels", student.spec.fpn_channels)
            params.setdefault("teacher_channels", teacher.spec.fpn_channels)
        try:
            losses.append(create_loss(spec.name, weight=spec.weight, pairer=spec.pairer, pairer_params=spec.pairer_params, **params))
        except ConfigError as exc:
            raise ConfigError(f"recipe {recipe.name}: losses[{i}]: {exc}") from None
    return losses


def check_teacher_quality(teacher, val_set, recipe: Recipe, force: bool, show_progress: bool) -> dict[str, float]:
    """Evaluate the teacher on val; refuse a teacher that detects (almost) nothing unless forced.

    A teacher trained on other classes, or a wrong checkpoint, silently turns distillation into
    noise: this is the most common failure users of KD tools report.
    """
    from distill.engine.evaluate import evaluate_detector
    from distill.report import make_progress

    with make_progress(show_progress) as bar:
        task = bar.add_task("teacher eval", total=len(val_set), info="")
        metrics = evaluate_detector(teacher.model, val_set, recipe.eval.batch_size, progress=lambda done, total: bar.update(task, completed=done))
    min_ap = recipe.teacher.min_ap if recipe.teacher else 0.05
    if metrics["AP"] < min_ap and not force:
        raise ConfigError(
            f"teacher {teacher.meta.get('path', '')} has val AP {metrics['AP']:.4f} < teacher.min_ap {min_ap} on this data; "
            "distilling from it would teach noise (wrong classes or checkpoint?); pass --force to distill anyway"
        )
    return metrics


def distill_run(
    recipe: Recipe,
    teacher_path: str | Path,
    data: str | Path,
    out: str | Path,
    force: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    cache: str | Path | None = None,
) -> FitResult:
    """Distill ``recipe``'s student from the teacher checkpoint on ``data``; writes into ``out``.

    ``cache``: a teacher cache built by ``detkd cache`` for this teacher and data; the teacher rows
    then come from it and the teacher is not run in training steps. A cache that does not fit the
    teacher, data, transform, regions or flips is refused before anything else runs.
    """
    import torch

    from distill.engine.distiller import Distiller
    from teachers import TeacherCache, load_teacher
    from teachers.checks import check_pair, class_index_for

    out, train_set, val_set, student = prepare_run(recipe, data, out, resume)
    teacher = load_teacher(teacher_path)
    class_map = recipe.teacher.class_map if recipe.teacher else {}
    index = class_index_for(train_set.classes, teacher.classes, class_map, where=str(teacher.meta.get("path", teacher_path)))
    if index is not None:
        teacher.class_index = torch.tensor(index, dtype=torch.long)
    losses = build_losses(recipe, student, teacher)
    check_pair(student.spec, teacher.spec, losses)
    teacher_cache = None
    if cache is not None:
        teacher_cache = TeacherCache.open(cache)  # sizes and sha256 of every shard
        teacher_cache.check_run(teacher, train_set, losses, recipe.data.size_divisor, student)
    teacher_metrics = check_teacher_quality(teacher, val_set, recipe, force, show_progress)
    meta = run_meta(student, train_set, recipe, data)
    meta["teacher"] = {"path": teacher.meta.get("path"), "val": teacher_metrics}
    if teacher_cache is not None:
        meta["teacher"]["cache"] = {"path": str(cache), "key": teacher_cache.manifest["key"]}
    write_run_info(out, meta, "distill", resume)
    distiller = Distiller(student, teacher, losses, recipe, cache=teacher_cache)
    return distiller.fit(train_set, val_set, out, meta=meta, resume=resume, show_progress=show_progress)
