"""Teacher cache: training-step cost, build throughput and size against the online teacher.

In one run, on the same data and batches:

- median training step (forward, losses, backward, optimizer step) of (a) the student alone,
  (b) distillation with the online teacher, (c) distillation from the cache; the three are
  interleaved step by step so that load from other processes hits them alike;
- cache build throughput (images x variants per second, everything ``build_cache`` does: hashing,
  teacher, regions, gathering, checksums, atomic writes) against plain teacher inference over the
  same loader (forward only, timed before and after the build, averaged);
- bytes per cached image variant against the dense fp16 teacher maps of the same parts.

The student, the losses and the input size come from a distillation recipe (default ``ld-tiny``:
Main LD + VLR LD + Main KD + feature imitation in GT boxes); the teacher is a GFL of the given size
(random weights: costs do not depend on what the teacher learned) or a checkpoint (``--teacher``).

    python benchmarks/cache.py --threads 1

Results: a rich table, and JSON in benchmarks/results/cache.json.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import command_line, interleaved_medians, optimizer_step  # the benchmarks' shared helpers (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table

from distill.data import DetectionTransform, build_loader, generate_scenes, load_dataset
from distill.engine.build import build_detector
from distill.engine.cache import cache_plan
from distill.engine.distiller import Distiller
from distill.engine.run import build_losses
from distill.engine.trainer import build_optimizer, detector_step
from recipes import load_recipe
from students import create_student
from teachers import FrozenTeacher, TeacherCache, build_cache, load_teacher
from teachers.cache_build import entry_loader, shard_pairs

RESULTS = Path(__file__).parent / "results" / "cache.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="ld-tiny", help="distillation recipe (student, losses, image size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, repeatable (e.g. student.params.backbone=mobilenetv2_100: the benchmarks' ImageNet student)")
    p.add_argument("--size", type=int, default=None, help="input size (default: the recipe's)")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--images", type=int, default=128, help="training images to generate (scenes)")
    p.add_argument("--data", type=Path, default=None, help="use this dataset instead of generated scenes")
    p.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint (default: a random GFL, below)")
    p.add_argument("--teacher-backbone", default="resnet18")
    p.add_argument("--teacher-fpn", type=int, default=64)
    p.add_argument("--teacher-convs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--build-batch", type=int, default=16, help="teacher batch for the build and plain inference")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def make_teacher(args: argparse.Namespace, classes: list[str]) -> FrozenTeacher:
    if args.teacher is not None:
        return load_teacher(args.teacher)
    torch.manual_seed(7)
    model = create_student("gfl", backbone=args.teacher_backbone, num_classes=len(classes), fpn_channels=args.teacher_fpn, head_convs=args.teacher_convs)
    return FrozenTeacher(model, {"classes": list(classes)})


def inference_seconds(teacher: FrozenTeacher, dataset, variants: tuple[str, ...], batch_size: int, canvas: tuple[int, int]) -> float:
    """Plain teacher inference (load, collate, forward) over every image variant, as the build sees them."""
    pairs = shard_pairs(len(dataset), variants, len(dataset), 0)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in entry_loader(dataset, [pairs], batch_size, canvas):
            teacher.model.head(teacher.model.features(batch.images), batch.image_sizes)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="detkd-cache-bench-"))
    overrides = [*args.overrides, f"train.batch_size={args.batch}"] + ([f"data.image_size={args.size}"] if args.size else [])
    recipe = load_recipe(args.recipe, overrides)
    size = recipe.data.image_size
    data = args.data
    if data is None:
        data = work / "data"
        generate_scenes(data, num_train=args.images, num_val=4, size=size, seed=0)
    train = load_dataset(data, "train", DetectionTransform(size, hflip_prob=recipe.data.hflip_prob), seed=recipe.train.seed)
    teacher = make_teacher(args, train.classes)
    spec, matcher = cache_plan(teacher, list(train.classes), recipe)  # as detkd cache --recipe plans it

    # Build throughput against plain inference (inference timed before and after, averaged).
    from teachers.cache_format import canvas_for

    canvas = canvas_for(size, recipe.data.size_divisor)
    infer = [inference_seconds(teacher, train, spec.variants, args.build_batch, canvas)]
    started = time.perf_counter()
    summary = build_cache(teacher, train, work / "cache", spec, matcher=matcher, batch_size=args.build_batch, show_progress=False)
    build_s = time.perf_counter() - started
    infer.append(inference_seconds(teacher, train, spec.variants, args.build_batch, canvas))
    entries = summary["entries"]

    # Training steps: the same initial student three times, each with its own optimizer.
    cache = TeacherCache.open(work / "cache")
    base = build_detector(recipe, num_classes=len(train.classes))
    students = {name: copy.deepcopy(base).train() for name in ("student", "online", "cache")}
    modes = {"student": (students["student"], detector_step, build_optimizer(list(students["student"].named_parameters()), recipe))}
    for name, source in (("online", None), ("cache", cache)):
        losses = build_losses(recipe, students[name], teacher)
        distiller = Distiller(students[name], teacher, losses, recipe, cache=source)
        if source is not None:
            cache.check_run(teacher, train, losses, recipe.data.size_divisor, students[name])
        params = list(students[name].named_parameters()) + [(f"l{i}.{n}", p) for i, loss in enumerate(losses) for n, p in loss.named_parameters()]
        modes[name] = (students[name], distiller.step, build_optimizer(params, recipe))
    loader = build_loader(cache.training_set(train), args.batch, shuffle=True, seed=0, drop_last=True)
    batches = list(loader)

    def cycled(model, step_fn, optimizer):  # every mode steps through the same batches in lockstep
        order = itertools.cycle(batches)
        return lambda: optimizer_step(step_fn, model, next(order), optimizer)()

    median = interleaved_medians({name: cycled(*mode) for name, mode in modes.items()}, repeats=args.steps, warmup=args.warmup)

    results = {
        "command": command_line(),
        "recipe": recipe.name,
        "image_size": size,
        "batch": args.batch,
        "images": len(train),
        "variants": list(spec.variants),
        "teacher": str(args.teacher) if args.teacher else f"gfl {args.teacher_backbone} fpn {args.teacher_fpn} convs {args.teacher_convs} (random)",
        "threads": args.threads,
        "step_ms": {name: round(1000 * m, 2) for name, m in median.items()},
        "step_ratio_online_vs_student": round(median["online"] / median["student"], 3),
        "step_ratio_cache_vs_student": round(median["cache"] / median["student"], 3),
        "build_entries_per_s": round(entries / build_s, 2),
        "inference_entries_per_s": round(entries / statistics.mean(infer), 2),
        "build_vs_inference": round(statistics.mean(infer) / build_s, 3),
        "bytes_per_entry": summary["bytes_per_entry"],
        "dense_fp16_bytes_per_entry": summary["dense_fp16_bytes_per_entry"],
        "fraction_of_dense": summary["fraction_of_dense"],
        "head_rows_per_entry": summary["head_rows_per_entry"],
        "feature_rows_per_entry": summary["feature_rows_per_entry"],
        "locations_per_entry": summary["locations_per_entry"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    table = Table(title=f"teacher cache: {recipe.name}, {size} px, batch {args.batch}, teacher {results['teacher']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("(a) student alone, median step", f"{results['step_ms']['student']:.1f} ms", ""),
        ("(b) online teacher, median step", f"{results['step_ms']['online']:.1f} ms ({results['step_ratio_online_vs_student']:.2f}x a)", ""),
        ("(c) from the cache, median step", f"{results['step_ms']['cache']:.1f} ms ({results['step_ratio_cache_vs_student']:.2f}x a)", "<= 1.10x a"),
        ("cache build, image variants / s", f"{results['build_entries_per_s']:.1f}", ""),
        ("plain teacher inference, image variants / s", f"{results['inference_entries_per_s']:.1f}", ""),
        ("build / inference throughput", f"{results['build_vs_inference']:.2f}", ">= 0.90"),
        ("bytes per image variant (cache)", f"{results['bytes_per_entry']:.0f}", ""),
        ("bytes per image variant (dense fp16)", f"{results['dense_fp16_bytes_per_entry']}", ""),
        ("cache / dense", f"{results['fraction_of_dense']:.3f}", "well under 1"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {args.out}")
    shutil.rmtree(work, ignore_errors=True)  # generated scenes and the cache
    return results


if __name__ == "__main__":
    main()
