"""``detkd refine``: train a box refiner on a frozen detector, with the project's Trainer.

The refine recipe is built here from the detector's own settings (image size, size divisor) and the
reference's training settings (AdamW, lr 1e-4, weight decay 1e-4, clip 0.1, 12 epochs, lr x 0.1 at
epoch 11); ``--set`` changes any key, ``student.params.*`` being the refiner's (``saved.PARAMS``).
The Trainer gives resume, progress, the final table, atomic checkpoints, devices, AMP and torchrun;
it sees the :class:`RefinedDetector` as its model, whose parameters are the refiner's alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from distill import distributed as dist
from distill.config import Recipe, apply_overrides, override_source, read_yaml, recipe_from_dict
from distill.engine.trainer import FitResult
from distill.errors import ConfigError
from distill.report import console
from teachers.refine.refiner import parameter_count
from teachers.refine.saved import build_refined, check_params, file_sha256


def refine_recipe(detector_meta: dict[str, Any], overrides: list[str], stored: Path | None = None) -> Recipe:
    """The run's recipe: the stored one of a resumed run, else the defaults below; plus overrides."""
    if stored is not None:
        raw, source = read_yaml(stored), str(stored)
    else:
        source = "refine recipe"
        raw = {
            "name": "refinebox",
            "kind": "teacher",
            "purpose": "RefineBox: a box refiner trained on a frozen detector",
            "student": {"name": "refinebox", "params": {}},
            "data": {"image_size": detector_meta.get("image_size", 160), "size_divisor": detector_meta.get("size_divisor", 32), "hflip_prob": 0.5},
            "train": {
                "epochs": 12, "batch_size": 16, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "grad_clip": 0.1,
                "warmup_steps": 0, "schedule": "step", "milestones": [11], "gamma": 0.1,
            },
        }
    try:
        recipe = recipe_from_dict(apply_overrides(raw, overrides), source)
        if recipe.student.name != "refinebox":
            raise ConfigError(f"{source}: 'student.name' of a refine run is 'refinebox', got {recipe.student.name!r}")
        recipe.student.params = check_params(dict(recipe.student.params), source)
    except ConfigError as exc:
        raise override_source(exc, list(overrides), source) from None
    return recipe


def refine_run(
    detector_run: str | Path, data: str | Path, out: str | Path, overrides: list[str] | None = None, resume: bool = False,
    show_progress: bool = True, device: str | None = "cpu", amp: str | None = "off",
) -> FitResult:
    """Train a refiner for the detector checkpoint (or run folder) ``detector_run`` on ``data``."""
    from distill.checkpoint import resolve_checkpoint
    from distill.engine.build import apply_threads, build_datasets, run_meta, seed_everything
    from distill.engine.run import check_run_folder, read_run_info, removed_if_refused, session, write_run_info
    from distill.engine.trainer import Trainer, check_batches, check_splits
    from students.saved import load_detector
    from teachers.checks import check_same_classes
    from teachers.refine.model import RefinedDetector, box_targets

    out = Path(out)
    detector_path = resolve_checkpoint(detector_run).resolve()
    with session(device, amp) as runtime, removed_if_refused(out, resume):
        detector, detector_meta = load_detector(detector_path)
        if isinstance(detector, RefinedDetector):
            raise ConfigError(f"{detector_path}: is a refined run already; refine the detector it refines")
        digest = file_sha256(detector_path)
        recipe = refine_recipe(detector_meta, list(overrides or []), out / "recipe.yaml" if resume else None)
        if resume:
            recorded = read_run_info(out, kind="refine").get("refine") or {}
            if recorded.get("sha256") != digest:
                raise ConfigError(f"{out}: the detector {detector_path} changed since this refine run started; start a new run with detkd refine")
        check_run_folder(out, data, resume)
        apply_threads(recipe)
        train_set, val_set = build_datasets(recipe, data)
        check_same_classes(detector_meta["classes"], train_set.classes, what=str(detector_path), where=str(data))
        check_splits(train_set, val_set)
        check_batches(train_set, recipe)
        seed_everything(recipe.train.seed)  # the refiner's initialisation follows train.seed, on every rank alike
        model = build_refined(detector, recipe.student.params)
        refiner_params = parameter_count(model.refiner)
        meta = run_meta(detector, train_set, recipe, data)
        meta.update(kind="refine", refine={
            "detector": str(detector_path), "sha256": digest, "family": detector.family,
            "params": recipe.student.params, "parameters": refiner_params, "box_targets": box_targets(detector.family),
        })
        write_run_info(out, meta, "refine", resume, recipe.to_dict())
        if dist.is_main():
            console.print(f"refiner: {refiner_params:,} parameters on the frozen {detector.config.get('name')} ({detector_path})", markup=False, highlight=False)
        trainer = Trainer(model, recipe, train_set, val_set, out, meta, show_progress=show_progress, runtime=runtime)
        return trainer.fit(resume=resume)
