"""Whole runs from a recipe: what ``detkd train`` and the Python API call."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import yaml

from distill import distributed as dist
from distill.checkpoint import atomic_write_text, make_dir
from distill.config import Recipe
from distill.engine.build import apply_threads, build_datasets, build_detector, run_meta
from distill.engine.device import make_runtime
from distill.engine.trainer import FitResult, Trainer
from distill.errors import ConfigError


def check_fresh_run_dir(out: Path, data: str | Path | None = None) -> None:
    """A new run needs a new or empty folder, or one of a run killed before its first save (it holds
    no saved step: it starts again); never a file, a folder of other files, a dataset, a cache or a
    checkpoint folder; and it must be writable (checked by a probe file, before any work)."""
    from distill.outputs import check_output_folder, data_roots

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file; the run folder must be a new or empty folder")
    if (out / "train_state.safetensors").exists():
        raise ConfigError(f"{out}: already holds a run; pass --resume {out} to continue it, or choose another --out")
    check_output_folder(out, data_roots(data), owned=lambda folder: (folder / "run.json").is_file())


def check_run_folder(out: Path, data: str | Path | None, resume: bool) -> None:
    """A fresh run's folder (:func:`check_fresh_run_dir`) or a resumed one's (writable), checked on
    every rank before any rank goes on: rank 0 writes into it next, and a rank still checking would
    see rank 0's first files and refuse the folder as one that holds other files."""
    from distill.outputs import check_writable

    if resume:
        check_writable(out, "--resume")
    else:
        check_fresh_run_dir(out, data)
    dist.barrier()


@contextlib.contextmanager
def removed_if_refused(out: Path, resume: bool):
    """A run folder this command creates is removed again when the command fails before the run
    wrote anything but its stub (``recipe.yaml`` + ``run.json``): a refused command leaves nothing."""
    created = not resume and dist.is_main() and not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir() and _only_stub(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _only_stub(out: Path) -> bool:
    """Whether ``out`` holds nothing but a run's stub (and temporaries, an empty checkpoints/)."""
    for entry in out.iterdir():
        temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if entry.name not in ("recipe.yaml", "run.json", "checkpoints") and not temporary:
            return False
        if entry.name == "checkpoints" and any(entry.iterdir()):
            return False
    return True


def read_run_info(run: Path, kind: str | None = None) -> dict:
    """The run.json of ``run``; with ``kind``, refuse a run of the other kind (train vs distill)."""
    path = Path(run) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{run}: not a detkd run folder (no run.json)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: corrupt run.json ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(info, dict) or not isinstance(info.get("data"), str):
        raise ConfigError(f"{path}: corrupt run.json (no 'data' path)")
    if kind is not None and info.get("kind", kind) != kind:
        raise ConfigError(f"{run}: is a {info.get('kind')} run; resume it with detkd {info.get('kind')} --resume {run}")
    return info


def prepare_run(recipe: Recipe, data: str | Path, out: str | Path, resume: bool):
    """What every run starts with: a fresh (or resumed) folder, threads, datasets, the student."""
    from distill.engine.trainer import check_batches, check_splits

    out = Path(out)
    check_run_folder(out, data, resume)
    apply_threads(recipe)
    train_set, val_set = build_datasets(recipe, data)
    check_splits(train_set, val_set)  # before the run folder exists: a refused run leaves none
    check_batches(train_set, recipe)
    dist.local_batch_size(recipe.train.batch_size)
    model = build_detector(recipe, num_classes=len(train_set.classes))
    return out, train_set, val_set, model


def write_run_info(out: Path, meta: dict, kind: str, resume: bool, recipe_dict: dict | None = None) -> None:
    if not dist.is_main():
        return
    make_dir(out)
    if not resume or not (out / "run.json").is_file():  # a resumed run keeps the run.json it started with
        # recipe.yaml before run.json: a folder with a run.json can always be resumed
        if recipe_dict is not None:
            atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe_dict, sort_keys=False))
        atomic_write_text(out / "run.json", json.dumps({**meta, "kind": kind}, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def session(device: str | None, amp: str | None):
    """The run's Runtime; joins (and leaves) the torchrun process group when launched by torchrun."""
    runtime = make_runtime(device, amp)
    joined = not dist.is_distributed() and dist.init_from_env(runtime.torch_device)
    try:
        with runtime.precision():  # models are built inside: fp64 parameters in a reference run
            yield runtime
    finally:
        if joined:
            dist.shutdown()


def train_run(
    recipe: Recipe, data: str | Path, out: str | Path, resume: bool = False, show_progress: bool = True,
    device: str | None = "cpu", amp: str | None = "off",
) -> FitResult:
    """Train ``recipe``'s detector on ``data``; writes everything into ``out``.

    ``device``: auto | cpu | cuda[:N]; ``amp``: off | bf16 | fp16. Under torchrun, DDP (gloo on the
    CPU, nccl on CUDA) with ``train.batch_size`` as the global batch.
    """
    with session(device, amp) as runtime, removed_if_refused(Path(out), resume):
        out, train_set, val_set, model = prepare_run(recipe, data, out, resume)
        meta = run_meta(model, train_set, recipe, data)
        meta["kind"] = "train"
        write_run_info(out, meta, "train", resume, recipe.to_dict())
        trainer = Trainer(model, recipe, train_set, val_set, out, meta, show_progress=show_progress, runtime=runtime)
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
        metrics = evaluate_detector(teacher.detector, val_set, recipe.eval.batch_size, progress=lambda done, total: bar.update(task, completed=done))
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
    device: str | None = "cpu",
    amp: str | None = "off",
) -> FitResult:
    """Distill ``recipe``'s student from the teacher checkpoint on ``data``; writes into ``out``.

    ``cache``: a teacher cache built by ``detkd cache`` for this teacher and data; the teacher rows
    then come from it and the teacher is not run in training steps. A cache that does not fit the
    teacher, data, transform, regions or flips is refused before anything else runs.
    """
    if not recipe.losses:
        raise ConfigError(f"recipe {recipe.name}: has no distillation terms (losses is empty); train it with detkd train instead")
    with session(device, amp) as runtime, removed_if_refused(Path(out), resume):
        return _distill(recipe, teacher_path, data, out, force, resume, show_progress, cache, runtime)


def _distill(recipe, teacher_path, data, out, force, resume, show_progress, cache, runtime) -> FitResult:
    import torch

    from distill.engine.distiller import Distiller
    from teachers import TeacherCache, load_teacher
    from teachers.checks import class_index_for

    out, train_set, val_set, student = prepare_run(recipe, data, out, resume)
    teacher = load_teacher(teacher_path).to(runtime.torch_device)
    class_map = recipe.teacher.class_map if recipe.teacher else {}
    index = class_index_for(train_set.classes, teacher.classes, class_map, where=str(teacher.meta.get("path", teacher_path)))
    if index is not None:
        teacher.class_index = torch.tensor(index, dtype=torch.long, device=runtime.torch_device)
    losses = build_losses(recipe, student, teacher)
    teacher_cache = TeacherCache.open(cache) if cache is not None else None  # sizes and sha256 of every shard
    distiller = Distiller(student, teacher, losses, recipe, cache=teacher_cache)  # every loss's pair check
    split = distiller.check_cache(train_set)  # before the teacher's evaluation: a cache that does not fit is refused first
    teacher_metrics = check_teacher_quality(teacher, val_set, recipe, force, show_progress)
    meta = run_meta(student, train_set, recipe, data)
    meta["kind"] = "distill"
    reference = teacher.meta["path"] if teacher.meta.get("external") else str(Path(teacher.meta.get("path")).resolve())  # tv: / hf: references are absolute already
    meta["teacher"] = {"path": reference, "val": teacher_metrics, "force": bool(force)}
    if teacher_cache is not None:
        meta["teacher"]["cache"] = {"path": str(Path(cache).resolve()), "key": teacher_cache.manifest["key"]}
    if isinstance(teacher.meta.get("refine"), dict):  # a `detkd refine` run: what its box targets are
        meta["teacher"]["refined"] = {k: teacher.meta["refine"].get(k) for k in ("detector", "sha256", "box_targets")}
    write_run_info(out, meta, "distill", resume, recipe.to_dict())
    return distiller.fit(split, val_set, out, meta=meta, resume=resume, show_progress=show_progress, runtime=runtime, cache_checked=True)
