"""Does distillation make a one-layer sparse student better? ASAG-S alone vs distilled, per correspondence.

    python benchmarks/sparse_gain.py --threads 1            # full profile (hours of CPU: see --only)
    python benchmarks/sparse_gain.py --quick --threads 1    # minutes: tiny data, 2 epochs, 1 seed
    python benchmarks/sparse_gain.py --profile long --reuse benchmarks/results/sparse_gain-full --only alone,gfl-gt
                                                            # students 16 epochs, the full profile's teachers

The sparse sibling of ``distill_gain.py``. On one scenes split (400 train / 100 val images, 128 px):

1. the teachers, each trained once with ``detkd train`` semantics: the 6-stage sparse model with
   Group DETR (``sparse6-tiny``, 3 query groups in training), the dense GFL teacher
   (``gfl-teacher``, ImageNet EfficientNet-Lite0 from the offline wheel) and, for the ``dab-*`` rows
   (``--only``), six-layer DAB-DETR with Group DETR (``dab-teacher``, same backbone, twice the epochs);
2. the student of ``asag-distill-sparse6`` / ``asag-distill-gfl`` (ASAG-S fed by the anchor
   generator, bins head, one decoder layer; the two recipes share it) trained alone;
3. the same student distilled with one correspondence per row -- GT-bridged, teacher-set
   Hungarian, shared distillation queries -- from each teacher, class KD + box KD on that row's
   pairs (GFL's GT-bridged row adds LD re-encoded in the student's bins, as its recipe does);
   the recipes as shipped (every term together) are extra rows (``--only s6-recipe,gfl-recipe``);
4. the cost of one training step per row: student alone, distillation with the online teacher,
   the teacher's forward, and the distillation terms alone (pairs + losses + their backward; for
   shared queries also the student's extra decoder pass on the teacher's boxes), interleaved medians.

Every student row uses the same schedule and the seeds of the profile. A run folder with a
``summary.json`` is reused, so an interrupted benchmark resumes and separate processes can train
disjoint rows (``--only``, ``--seeds``) before one last call summarises. Prints tables and writes
``sparse_gain.json``. Gap closed = (row AP - alone AP) / (teacher AP - alone AP), on seed means.

Every run's final checkpoint is also evaluated on a tuning split (``data-tune``: scenes of another
generator seed, as many images as val). The row to recommend is the one with the largest paired
gain on the tuning split; val AP only reports the rows, so the choice does not fit val.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import (  # the benchmarks' shared helpers (this script's folder is on sys.path)
    Row,
    command_line,
    fresh,
    gain_interval,
    heldout_metrics,
    interleaved_medians,
    large_data,
    leaf_predictions,
    optimizer_step,
    paired_gains,
    profile_data,
    row_recipe,
    select_rows,
    tune_data,
)
from rich.console import Console
from rich.table import Table

from distill.checkpoint import atomic_write_text
from distill.data import GENERATORS
from distill.engine.demo import baseline_recipe, finished, gap_closed
from distill.engine.refine import refine_run
from distill.engine.run import distill_run, train_run
from recipes import load_recipe

PROFILES = {
    "full": {"train": 400, "val": 100, "size": 128, "teacher_epochs": 24, "student_epochs": 8, "seeds": [0, 1, 2]},
    # the same data, teachers and rows with students trained twice as long (800 steps)
    "long": {"train": 400, "val": 100, "size": 128, "teacher_epochs": 24, "student_epochs": 16, "seeds": [0, 1, 2]},
    "quick": {"train": 48, "val": 16, "size": 128, "teacher_epochs": 2, "student_epochs": 2, "seeds": [0], "force": True},
}
# teacher slug -> (teacher recipe, its overrides)
TEACHERS = {
    "sparse6": ("sparse6-tiny", ["student.params.groups=3"]),
    "gfl": ("gfl-teacher", []),
    # DAB-DETR: six layers, Group DETR, bins head, ImageNet EfficientNet-Lite0 (the GFL teacher's backbone)
    "dab": ("dab-teacher", []),
}
# Refined teachers: slug -> (the teacher refined, the refiner's settings): ``detkd refine`` on that
# teacher's run with benchmarks/refine.py's schedule (12 epochs, lr 1e-3, refiner seed 0).
REFINED = {"dab-refined": ("dab", ["train.epochs=12", "train.lr=1e-3", "train.seed=0"])}
# The query teachers' rows distil from their query cache (``detkd cache``: every query row and its
# matches for both flips, exact up to fp16 rows; tests/test_cache_queries.py), so their six layers do
# not run in every step, except rows whose terms read the teacher's feature maps (no cache serves
# them: those run the teacher online). The GFL teacher runs online (the dense cache serves dense students only).
CACHED = {"sparse6", "dab"}
# DETR-style decoders converge slowly: the DAB teacher trains for this multiple of the profile's teacher epochs.
TEACHER_EPOCH_FACTOR = {"dab": 2}
# The students (distill recipes whose student and schedule every row of that student uses):
RANDOM = "asag-distill-sparse6"  # ASAG-S, random-init ResNet-10t (every table's student unless a row says otherwise)
# The same ASAG-S on ImageNet MobileNetV2-1.0 from the offline wheel (the usual case; same schedule)
IMAGENET = ("student.params.backbone=mobilenetv2_100", "student.params.pretrained=offline")
KD_BOX = lambda pairer, kd=1.0, heads="all", extra=None: (  # noqa: E731
    {"name": "kd", "weight": kd, "pairer": pairer, "params": {"heads": heads}, **(extra or {})},
    {"name": "box", "weight": 1.0, "pairer": pairer, "params": {"heads": heads}, **(extra or {})},
)
TOP50 = {"pairer_params": {"top_k": 50}}
TOP16 = {"pairer_params": {"top_k": 16}}  # fewer teacher boxes through the student's decoder: a cheaper extra pass
LD_GT = ({"name": "ld", "weight": 0.25, "pairer": "gt_bridged", "params": {"temperature": 10}},)
# Feature mimicking on every FPN location, the dense benchmark's recommended term (ld-full-feat:
# weight 2, relative MSE) taken as is (the scan below tunes it); 1x1 adapter from the student's 32-ch P3-P5
# to the GFL teacher's 96-ch maps at the same strides (its P6-P7 have no student counterpart).
FEAT = lambda teacher_channels, weight=2.0: ({"name": "feature", "weight": weight, "pairer": "all",  # noqa: E731
                                              "params": {"student_channels": 32, "teacher_channels": teacher_channels}},)
FEAT_GFL = FEAT(96)
# The feature weight scanned on the tuning split (2 above, 6, 12, 24, 48): of the terms, only feature mimicking
# carries what the GT does not at every location, so its weight is the first knob to turn.
FEAT_WEIGHTS = (6, 12, 24, 48)
# The same against dab-teacher's 128-wide projected maps at strides 8-32 (the student's P3-P5 levels).
FEAT_DAB = FEAT(128)
# CrossKD for query detectors (crosskd_query), the weights of KD_BOX's terms; Linear adapter 32 -> 128 (dab-teacher's width).
CROSS = lambda teacher_channels: tuple(  # noqa: E731
    {"name": "crosskd_query", "weight": 1.0, "pairer": "crossed_queries", "pairer_params": {"weighting": w},
     "params": {"part": part, "student_channels": 32, "teacher_channels": teacher_channels}}
    for part, w in (("cls", "uniform"), ("box", "confidence")))
CROSS_DAB = CROSS(128)
# Rows that differ from a timed row only in loss weights: a weight is one scalar multiply, so the
# step (and its cost record, --cost-from) is that row's.
SAME_STEP = {**{f"gfl-gt-feat{w}": "gfl-gt-feat" for w in FEAT_WEIGHTS}, "gfl-feat24": "gfl-feat", "dab-gt-ld-feat24": "dab-gt-ld-feat"}


def distilled(name: str, slug: str, teacher: str, losses: tuple | None, student: tuple[str, ...] = (), default: bool = True, recipe: str = RANDOM) -> Row:
    """A distilled row: ``recipe`` (the random-init student's, or another with the same student) with
    ``losses`` and the ``student`` overrides, paired with that student alone."""
    return Row(name, slug, recipe, overrides=student, teacher=teacher, losses=losses, baseline=ALONE[student], default=default)


ALONE = {(): "alone", IMAGENET: "alone-in"}
ROWS = [
    Row("ASAG-S alone (no KD)", "alone", RANDOM),
    distilled("6-stage -> ASAG: GT-bridged, KD + box", "s6-gt", "sparse6", KD_BOX("gt_bridged")),
    distilled("6-stage -> ASAG: teacher-set, KD + box", "s6-set", "sparse6", KD_BOX("teacher_set", 0.5, "final", TOP50)),
    distilled("6-stage -> ASAG: shared queries, KD + box", "s6-shared", "sparse6", KD_BOX("shared_queries", 1.0, "final", TOP50)),
    distilled("6-stage -> ASAG: shared queries top-16, KD + box", "s6-shared16", "sparse6", KD_BOX("shared_queries", 1.0, "final", TOP16), default=False),
    distilled("6-stage -> ASAG: recipe as shipped", "s6-recipe", "sparse6", None, default=False),
    distilled("GFL -> ASAG: GT-bridged, KD + box + LD", "gfl-gt", "gfl", KD_BOX("gt_bridged") + LD_GT),
    distilled("GFL -> ASAG: teacher-set, KD + box", "gfl-set", "gfl", KD_BOX("teacher_set", 0.5, "final", TOP50)),
    distilled("GFL -> ASAG: shared queries, KD + box", "gfl-shared", "gfl", KD_BOX("shared_queries", 1.0, "final", TOP50)),
    distilled("GFL -> ASAG: feature mimicking (all locations)", "gfl-feat", "gfl", FEAT_GFL),
    distilled("GFL -> ASAG: GT-bridged KD + box + LD + features", "gfl-gt-feat", "gfl", KD_BOX("gt_bridged") + LD_GT + FEAT_GFL),
    *[distilled(f"GFL -> ASAG: GT-bridged KD + box + LD + features x{w}", f"gfl-gt-feat{w}", "gfl", KD_BOX("gt_bridged") + LD_GT + FEAT(96, float(w)), default=False)
      for w in FEAT_WEIGHTS],
    distilled("GFL -> ASAG: feature mimicking x24 (all locations)", "gfl-feat24", "gfl", FEAT(96, 24.0), default=False),
    distilled("GFL -> ASAG: shared queries top-16, KD + box", "gfl-shared16", "gfl", KD_BOX("shared_queries", 1.0, "final", TOP16), default=False),
    distilled("GFL -> ASAG: recipe as shipped", "gfl-recipe", "gfl", None, default=False, recipe="asag-distill-gfl"),
    # The DAB-DETR table (opt-in with --only: its teacher is the most expensive part of the benchmark):
    # the ImageNet-pretrained student alone and distilled from six-layer DAB-DETR.
    Row("ASAG-S (ImageNet MobileNetV2) alone (no KD)", "alone-in", RANDOM, IMAGENET, default=False),
    distilled("DAB-DETR -> ImageNet ASAG: GT-bridged, KD + box", "dab-gt", "dab", KD_BOX("gt_bridged"), IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: teacher-set, KD + box", "dab-set", "dab", KD_BOX("teacher_set", 0.5, "final", TOP50), IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: shared queries, KD + box", "dab-shared", "dab", KD_BOX("shared_queries", 1.0, "final", TOP50), IMAGENET, False),
    # KD-DETR's points: the teacher's 50 boxes plus 50 random boxes through both decoders
    distilled("DAB-DETR -> ImageNet ASAG: shared queries + 50 random points (KD-DETR), KD + box", "dab-kddetr", "dab",
              KD_BOX("shared_queries", 1.0, "final", {"pairer_params": {"top_k": 50, "random": 50}}), IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: GT-bridged KD + box + LD (bins to bins)", "dab-gt-ld", "dab", KD_BOX("gt_bridged") + LD_GT, IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: feature mimicking (all locations)", "dab-feat", "dab", FEAT_DAB, IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: GT-bridged KD + box + LD + features", "dab-gt-ld-feat", "dab", KD_BOX("gt_bridged") + LD_GT + FEAT_DAB, IMAGENET, False),
    distilled("DAB-DETR -> ImageNet ASAG: GT-bridged KD + box + LD + features x24", "dab-gt-ld-feat24", "dab", KD_BOX("gt_bridged") + LD_GT + FEAT(128, 24.0), IMAGENET, False),
    distilled("DAB-DETR -> ASAG: recipe as shipped", "dab-recipe", "dab", None, recipe="asag-distill-dab", default=False),
    # The same teacher into the random-init student: the GFL teacher's shipped terms (GT-bridged
    # KD + box + LD + features x24; asag-distill-dab ships them) and feature mimicking x24 alone.
    distilled("DAB-DETR -> ASAG: GT-bridged KD + box + LD + features x24", "dab-gt-feat24", "dab",
              KD_BOX("gt_bridged") + LD_GT + FEAT(128, 24.0), default=False),
    distilled("DAB-DETR -> ASAG: feature mimicking x24 (all locations)", "dab-feat24", "dab", FEAT(128, 24.0), default=False),
    # CrossKD for queries: the student's proposal content through the teacher's last decoder layer (class
    # quality-focal KD on every query, L1 + GIoU weighted by the teacher's confidence); alone and with features x24
    distilled("DAB-DETR -> ASAG: CrossKD (queries through the teacher's last layer)", "dab-crosskd", "dab", CROSS_DAB, default=False),
    distilled("DAB-DETR -> ASAG: CrossKD + features x24", "dab-crosskd-feat24", "dab", CROSS_DAB + FEAT(128, 24.0), default=False),
    # RefineBox: the same row from the refined DAB-DETR (its refined boxes are the box-KD and LD targets;
    # features and class scores are the frozen detector's), compared with the unrefined row (VERSUS).
    distilled("RefineBox DAB-DETR -> ASAG: GT-bridged KD + box + LD + features x24", "dab-gt-feat24-refined", "dab-refined",
              KD_BOX("gt_bridged") + LD_GT + FEAT(128, 24.0), default=False),
]
# rows also compared, paired by seed, with another distilled row
VERSUS = {"dab-gt-feat24-refined": "dab-gt-feat24"}
console = Console(width=160)


def needs_online_teacher(recipe) -> bool:
    """Whether a term of ``recipe`` reads what no query cache holds: the teacher's feature maps, or its
    decoder run on new boxes at every step (KD-DETR's random points)."""
    from distill.losses import loss_from_spec

    terms = [loss_from_spec(s) for s in recipe.losses]
    return any("features" in t.needs or t.cache_refusal or t.pairer.cache_refusal for t in terms)


def student_sets(profile: dict, threads: int, seed: int) -> list[str]:
    return [f"data.image_size={profile['size']}", f"train.threads={threads}", f"train.epochs={profile['student_epochs']}",
            f"train.seed={seed}", "train.eval_every=1000"]


def train_teachers(out: Path, profile: dict, threads: int, wanted: set[str]) -> dict[str, dict]:
    data = profile_data(out, profile)
    teachers = {}
    for slug in (t for t in TEACHERS if t in wanted):  # a fixed order: the tables list teachers alike every call
        recipe_name, overrides = TEACHERS[slug]
        run = out / f"teacher-{slug}"
        if fresh(run):
            epochs = profile["teacher_epochs"] * TEACHER_EPOCH_FACTOR.get(slug, 1)
            sets = overrides + [f"data.image_size={profile['size']}", f"train.threads={threads}", f"train.epochs={epochs}", "train.eval_every=1000"]
            console.print(f"[bold]teacher {slug}[/] ({recipe_name}) -> {run}")
            train_run(load_recipe(recipe_name, sets), data, run)
        teachers[slug] = finished(run)
    for slug in (t for t in REFINED if t in wanted):
        base, sets = REFINED[slug]
        run = out / f"teacher-{slug}"
        if fresh(run):
            console.print(f"[bold]teacher {slug}[/] (teacher-{base} + RefineBox) -> {run}")
            refine_run(out / f"teacher-{base}", data, run, [*sets, f"train.threads={threads}", "train.eval_every=1000"])
        teachers[slug] = finished(run)
    return teachers


def teacher_recipe(slug: str) -> str:
    """What teacher ``slug`` is, for the tables: its recipe, or the teacher it refines."""
    return TEACHERS[slug][0] if slug in TEACHERS else f"{TEACHERS[REFINED[slug][0]][0]} + RefineBox"


def link_shared(out: Path, reuse: Path) -> None:
    """Read the data, tuning split, teachers and teacher caches of benchmark folder ``reuse`` from
    ``out`` (symlinks; nothing is copied or retrained). Its profile must have the same data and teachers."""
    for part in sorted(reuse.iterdir()):
        if part.name in ("data", "data-tune") or part.name.startswith(("teacher-", "cache-", "data-large")):
            link = out / part.name
            try:
                link.symlink_to(part.resolve(), target_is_directory=True)
            except FileExistsError:  # linked before (or by a process training other rows)
                pass





def teacher_cache(out: Path, teacher_slug: str, recipe: str) -> Path:
    """The teacher's cache on the training split for ``recipe``'s student input (built once with
    ``detkd cache``; resumed if interrupted). Query caches hold every row, whatever the terms, and
    every row of this benchmark has the same input size and flips, so one cache per teacher."""
    cache = out / f"cache-{teacher_slug}"
    if not (cache / "summary.json").is_file():
        teacher = out / f"teacher-{teacher_slug}"
        subprocess.run([sys.executable, "-m", "distill", "cache", str(teacher), "--data", str(out / "data"), "--out", str(cache), "--recipe", recipe], check=True)
    return cache


def train_rows(out: Path, profile: dict, threads: int, rows: list, large: Path | None = None) -> dict[str, list[dict]]:
    data, results, tune = out / "data", {}, tune_data(out, profile)
    for row in rows:
        for seed in profile["seeds"]:
            run = out / f"{row.slug}-s{seed}"
            if fresh(run):
                sets = student_sets(profile, threads, seed)
                console.print(f"[bold]{row.name}[/] seed {seed} -> {run}")
                recipe = row_recipe(row, sets)
                if row.teacher is None:
                    train_run(baseline_recipe(recipe), data, run)
                else:
                    cached = row.teacher in CACHED and not needs_online_teacher(recipe)
                    cache = teacher_cache(out, row.teacher, row.recipe) if cached else None
                    # quick: 2-epoch teachers are below min_ap by design; force past the quality check there only
                    distill_run(recipe, out / f"teacher-{row.teacher}", data, run, force=profile.get("force", False), cache=cache)
            record = {"seed": seed, "run": str(run), **finished(run), "tune": heldout_metrics(run, tune)}
            if large is not None:
                record["large"] = heldout_metrics(run, large, large.name)
            results.setdefault(row.slug, []).append(record)
    return results


def measure_cost(out: Path, profile: dict, threads: int, rows: list[Row], repeats: int) -> dict:
    """Median step times of every distilled row against its student alone, on one training batch."""
    from distill.data import DetectionTransform, collate, load_dataset
    from distill.engine.build import build_detector
    from distill.engine.distiller import Distiller, shared_sides
    from distill.engine.run import build_losses
    from distill.engine.trainer import build_optimizer, detector_step
    from teachers import load_teacher

    torch.set_num_threads(threads)
    sets = student_sets(profile, threads, 0)
    by_slug = {row.slug: row for row in ROWS}
    distilled_rows = [row for row in rows if row.teacher is not None]
    teachers = {slug: load_teacher(out / f"teacher-{slug}") for slug in {row.teacher for row in distilled_rows}}
    students, fns, loss_counts = {}, {}, {}
    for slug in dict.fromkeys(row.baseline for row in distilled_rows):  # each student once, with its own optimizer
        recipe = row_recipe(by_slug[slug], sets)
        dataset = load_dataset(out / "data", "train", DetectionTransform(recipe.data.image_size))
        batch = collate([dataset[i] for i in range(recipe.train.batch_size)])
        torch.manual_seed(0)
        student = build_detector(recipe, len(dataset.classes)).train()
        students[slug] = (student, batch, build_optimizer(list(student.named_parameters()), recipe), recipe)
        fns[f"{slug}:alone"] = optimizer_step(detector_step, *students[slug][:3])
    for row in distilled_rows:
        student, batch, optimizer, _ = students[row.baseline]
        recipe = row_recipe(row, sets)
        terms = build_losses(recipe, student, teachers[row.teacher])
        distiller = Distiller(student, teachers[row.teacher], terms, recipe)
        _, features, s_in = distiller.student_side(student, batch)
        # the terms' backward stops at the student's head outputs and features
        leaf_features = [f.detach().requires_grad_() for f in features]
        s_in = dataclasses.replace(s_in, predictions=leaf_predictions(s_in.predictions), features=leaf_features if s_in.features is not None else None)
        t_in = distiller.teacher_side(batch, s_in)

        def terms_only(distiller=distiller, s_in=s_in, t_in=t_in, leaf_features=leaf_features, batch=batch):
            sum(distiller.distillation_terms(student, leaf_features, s_in, t_in, batch).values()).backward()

        def teacher_only(distiller=distiller, s_in=s_in, batch=batch):
            distiller.teacher_side(batch, s_in)

        def decode_only(distiller=distiller, t_in=t_in, leaf_features=leaf_features, batch=batch, student=student):
            sides = shared_sides(distiller.losses, student, leaf_features, t_in, batch.image_sizes)
            sum(side.student.predictions.logits.sum() + side.student.predictions.boxes.sum() for side in sides.values()).backward()

        if distiller.needs_shared:  # the extra decoder pass alone (forward + backward), part of the terms' time
            fns[f"{row.slug}:decode"] = decode_only
        fns[f"{row.slug}:distill"] = optimizer_step(distiller.step, student, batch, optimizer)
        fns[f"{row.slug}:terms"] = terms_only
        fns[f"{row.slug}:teacher"] = teacher_only
        loss_counts[row.slug] = len(terms)
    medians = interleaved_medians(fns, repeats=repeats)
    cost = {"students": {slug: {"step_s": medians[f"{slug}:alone"], "batch_size": s[3].train.batch_size, "recipe": s[3].name} for slug, s in students.items()},
            "image_size": profile["size"], "threads": threads}
    for row in distilled_rows:
        alone = medians[f"{row.baseline}:alone"]
        slug = row.slug
        d, t, te = medians[f"{slug}:distill"], medians[f"{slug}:terms"], medians[f"{slug}:teacher"]
        cost[slug] = {"distill_step_s": d, "distill_over_alone": d / alone, "terms_s": t, "terms_over_alone": t / alone, "teacher_s": te, "num_terms": loss_counts[slug],
                      "without_teacher_over_alone": (d - te) / alone}  # what a step costs when the rows come from a cache
        if f"{slug}:decode" in medians:
            cost[slug]["extra_decode_s"] = medians[f"{slug}:decode"]
            cost[slug]["losses_without_decode_over_alone"] = (t - medians[f"{slug}:decode"]) / alone
    return cost


@torch.inference_mode()
def measure_inference(out: Path, profile: dict, threads: int, selected: dict[str, str], repeats: int) -> dict[str, dict]:
    """Inference time (eval mode, batch 16 val images, features + head + postprocess, median of
    interleaved repeats) of each query teacher, of the same architecture on the student's backbone
    (untrained: a DETR-style decoder's cost does not depend on its weights, its query count is fixed),
    and of the distilled student of the row chosen for it (seed 0's final checkpoint: a generator-fed
    student's cost depends on its anchors per image, so it must be the trained one)."""
    from distill.checkpoint import resolve_checkpoint
    from distill.data import DetectionTransform, collate, load_dataset
    from students import create_student
    from students.saved import load_detector

    torch.set_num_threads(threads)
    timings = {}
    for teacher_slug, slug in selected.items():
        teacher, meta = load_detector(resolve_checkpoint(out / f"teacher-{teacher_slug}"))
        if teacher.spec.family != "sparse":
            continue
        student, _ = load_detector(out / f"{slug}-s{profile['seeds'][0]}" / "checkpoints" / "last.safetensors")
        config = teacher.config
        params = {**config["params"], "backbone": student.config["params"]["backbone"], "pretrained": None}
        torch.manual_seed(0)
        same_backbone = create_student(config["name"], **params)
        val = load_dataset(out / "data", "val", DetectionTransform(meta["image_size"], hflip_prob=0.0))
        batch = collate([val[i] for i in range(min(16, len(val)))])
        models = {"teacher": teacher.eval(), "teacher_arch_student_backbone": same_backbone.eval(), "student": student.eval()}
        fns = {name: (lambda m=m: m.postprocess(m.head(m.features(batch.images), batch.image_sizes), batch.image_sizes)) for name, m in models.items()}
        medians = interleaved_medians(fns, repeats=repeats)
        timings[teacher_slug] = {
            "row": slug, "batch_size": len(batch.images), "threads": threads, **{f"{name}_s": t for name, t in medians.items()},
            "student_backbone": student.config["params"]["backbone"], "teacher_backbone": config["params"]["backbone"],
            "speedup_vs_teacher": medians["teacher"] / medians["student"],
            "speedup_vs_teacher_arch_same_backbone": medians["teacher_arch_student_backbone"] / medians["student"],
        }
    return timings


def versus(runs: list[dict], other: list[dict], other_slug: str) -> dict:
    """Paired-by-seed AP differences of a row against another distilled row (val, tuning split and
    the larger report split where scored), with their 95% intervals."""
    result = {"row": other_slug}
    for split, pick in (("val", lambda r: r["final"]), ("tune", lambda r: r["tune"]), ("large", lambda r: r["large"])):
        if all(split == "val" or split in r for r in runs + other):
            diffs = paired_gains(runs, other, pick)
            result[split] = {"paired_gains": diffs, "mean": statistics.mean(diffs) if diffs else None, "ci95": gain_interval(diffs),
                             "seeds_above": sum(d > 0 for d in diffs)}
    return result


def summarise(teachers: dict, results: dict, rows: list[Row], cost: dict | None) -> dict:
    """Per row: val AP over seeds, paired gains over its own student alone (val, tuning split, the
    larger report split), the gap closed to its teacher and its step cost; per teacher, the row with
    the largest paired gain on the tuning split."""
    out_rows = {}
    for spec in rows:
        slug, teacher_slug = spec.slug, spec.teacher
        if slug not in results:
            continue
        base = results.get(spec.baseline or "", [])
        alone = statistics.mean(r["final"]["AP"] for r in base) if base else None
        alone_std = statistics.stdev(r["final"]["AP"] for r in base) if len(base) > 1 else 0.0
        aps = [r["final"]["AP"] for r in results[slug]]
        row = {"name": spec.name, "teacher": teacher_slug, "baseline": spec.baseline, "APs": aps, "AP_mean": statistics.mean(aps), "AP_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
               "AP50_mean": statistics.mean(r["final"]["AP50"] for r in results[slug]), "seeds": [r["seed"] for r in results[slug]],
               "train_seconds_mean": statistics.mean(r["seconds"] for r in results[slug])}
        if teacher_slug and alone is not None:
            t_ap = teachers[teacher_slug]["final"]["AP"]
            row["gain"] = row["AP_mean"] - alone
            spread = max(alone_std, row["AP_std"])
            row["gain_over_spread"] = row["gain"] / spread if spread > 0 else None  # one seed: no spread to compare with
            row["every_seed_above_alone"] = min(aps) > max(r["final"]["AP"] for r in base)  # the seed ranges do not overlap
            # Paired by seed: a seed fixes the student's initialisation and the data order in both
            # runs (build_detector seeds; the sampler is seeded per epoch), so per-seed differences
            # remove the between-seed spread of the student itself.
            diffs = paired_gains(results[slug], base)
            row["paired_gains"] = diffs
            row["paired_gain_mean"] = statistics.mean(diffs) if diffs else None
            row["paired_gain_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            row["seeds_above_alone"] = sum(d > 0 for d in diffs)
            row["paired_gain_ci95"] = gain_interval(diffs)
            row["gap_closed"] = gap_closed(t_ap, alone, row["AP_mean"])
            tune_diffs = paired_gains(results[slug], base, lambda r: r["tune"])
            row["tune_paired_gain_mean"] = statistics.mean(tune_diffs) if tune_diffs else None
            row["tune_seeds_above_alone"] = sum(d > 0 for d in tune_diffs)
        cost_slug = slug if slug in (cost or {}) else SAME_STEP.get(slug, slug)
        if teacher_slug and cost_slug in (cost or {}):
            row["cost"] = cost[cost_slug]
        row["tune_APs"] = [r["tune"]["AP"] for r in results[slug]]
        if all("large" in r for r in results[slug] + base):
            large_aps = [r["large"]["AP"] for r in results[slug]]
            row["large_APs"], row["large_AP_mean"] = large_aps, statistics.mean(large_aps)
            row["large_AP_std"] = statistics.stdev(large_aps) if len(large_aps) > 1 else 0.0
            if teacher_slug and base:
                large_diffs = paired_gains(results[slug], base, lambda r: r["large"])
                row["large_paired_gains"] = large_diffs
                row["large_paired_gain_mean"] = statistics.mean(large_diffs) if large_diffs else None
                row["large_paired_gain_std"] = statistics.stdev(large_diffs) if len(large_diffs) > 1 else 0.0
                row["large_paired_gain_ci95"] = gain_interval(large_diffs)
        if slug in VERSUS and VERSUS[slug] in results:
            row["versus"] = versus(results[slug], results[VERSUS[slug]], VERSUS[slug])
        out_rows[slug] = row
    # The row to recommend, per teacher, is chosen on the tuning split (paired gain there), never on val.
    selected = {}
    for teacher_slug in [*TEACHERS, *REFINED]:
        scored = {slug: row["tune_paired_gain_mean"] for slug, row in out_rows.items()
                  if row["teacher"] == teacher_slug and row.get("tune_paired_gain_mean") is not None}
        if scored:
            selected[teacher_slug] = max(scored, key=scored.get)
    return {"selected_on_tune": selected,
            "teachers": {s: {"AP": t["final"]["AP"], "AP50": t["final"]["AP50"], "seconds": t["seconds"]} for s, t in teachers.items()},
            "rows": out_rows}


def versus_lines(summary: dict) -> list[str]:
    """One line per row compared with another distilled row (``VERSUS``): paired gains per split."""
    lines = []
    for slug, row in summary["rows"].items():
        if "versus" in row:
            parts = [f"{split} {v['mean']:+.3f} {interval(v['ci95'])} ({v['seeds_above']}/{len(v['paired_gains'])} seeds up)"
                     for split, v in row["versus"].items() if split != "row" and v["mean"] is not None]
            lines.append(f"`{slug}` against `{row['versus']['row']}`, paired by seed: " + "; ".join(parts))
    return lines


def print_tables(summary: dict) -> None:
    p = summary["settings"]
    table = Table(title=f"sparse_gain ({summary['profile']}): COCO AP on {p.get('dataset', 'scenes')} val ({p['train']}/{p['val']} at {p['size']} px), final epoch, "
                        f"students {p['student_epochs']} epochs, seeds {p['seeds']}")
    for column in ("row", "AP (mean)", "± std", "APs", "AP50", "gain", "gain / spread", "gap closed", "tune gain", "distill step", "  w/o teacher", "terms / student step"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for slug, t in summary["teachers"].items():
        table.add_row(f"teacher {slug} ({teacher_recipe(slug)})", f"{t['AP']:.4f}", "", "", f"{t['AP50']:.4f}", "", "", "", "", "", "", "")
    for row in summary["rows"].values():
        c = row.get("cost")
        gap = "-" if row.get("gap_closed") is None else f"{100 * row['gap_closed']:.0f}%"
        table.add_row(
            row["name"], f"{row['AP_mean']:.4f}", f"{row['AP_std']:.4f}", " ".join(f"{a:.3f}" for a in row["APs"]), f"{row['AP50_mean']:.4f}",
            f"{row['gain']:+.4f}" if "gain" in row else "-", spread_text(row), gap,
            f"{row['tune_paired_gain_mean']:+.4f}" if row.get("tune_paired_gain_mean") is not None else "-",
            f"{c['distill_over_alone']:.2f}x" if c else "-", f"{c['without_teacher_over_alone']:.2f}x" if c else "-", f"{100 * c['terms_over_alone']:.1f}%" if c else "-",
        )
    console.print(table)
    for line in versus_lines(summary):
        console.print(line)
    console.print(f"rows chosen on the tuning split (largest paired gain there, per teacher): {summary.get('selected_on_tune')}")
    for teacher_slug, t in (summary.get("inference") or {}).items():
        console.print(f"inference, batch {t['batch_size']}: teacher {teacher_slug} {1000 * t['teacher_s']:.0f} ms, its architecture on the student's backbone "
                      f"{1000 * t['teacher_arch_student_backbone_s']:.0f} ms, distilled student ({t['row']}) {1000 * t['student_s']:.0f} ms: "
                      f"{t['speedup_vs_teacher']:.2f}x / {t['speedup_vs_teacher_arch_same_backbone']:.2f}x faster")
    for slug, alone in (summary.get("cost") or {}).get("students", {}).items():
        console.print(f"student step alone ({slug}): {1000 * alone['step_s']:.0f} ms (batch {alone['batch_size']}, "
                      f"{summary['cost']['threads']} threads, median of interleaved repeats)")


def print_costs(cost: dict) -> None:
    steps = ", ".join(f"{slug} {1000 * c['step_s']:.0f} ms (batch {c['batch_size']})" for slug, c in cost["students"].items())
    table = Table(title=f"step cost ({cost['image_size']} px, {cost['threads']} threads; student alone: {steps})")
    for column in ("row", "distill step", "w/o teacher", "terms / student step", "extra decode / student step"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for slug, c in cost.items():
        if isinstance(c, dict) and "distill_over_alone" in c:
            alone = c["distill_step_s"] / c["distill_over_alone"]
            decode = f"{100 * c['extra_decode_s'] / alone:.1f}%" if "extra_decode_s" in c else "-"
            table.add_row(slug, f"{c['distill_over_alone']:.2f}x", f"{c['without_teacher_over_alone']:.2f}x", f"{100 * c['terms_over_alone']:.1f}%", decode)
    console.print(table)


def spread_text(row: dict) -> str:
    return "-" if row.get("gain_over_spread") is None else f"{row['gain_over_spread']:+.1f}"


def interval(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown_table(summary: dict) -> str:
    """The README's table of one summary (every row as measured; '-' where a value does not apply)."""
    lines = ["| row | AP (mean ± std) | APs per seed | AP50 | gain | gain / spread | paired gain (± std) | 95% interval | seeds up | gap closed | tune gain (seeds up) | distill step | w/o teacher | terms / student step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for slug, t in summary["teachers"].items():
        lines.append(f"| teacher: {slug} (`{teacher_recipe(slug)}`) | {t['AP']:.3f} | – | {t['AP50']:.3f} | | | | | | | | | | |")
    for slug, row in summary["rows"].items():
        c = row.get("cost")
        gap = "–" if row.get("gap_closed") is None else f"{100 * row['gap_closed']:.0f}%"
        lines.append(
            f"| {row['name']} (`{slug}`) | {row['AP_mean']:.3f} ± {row['AP_std']:.3f} | {' / '.join(f'{a:.3f}' for a in row['APs'])} | {row['AP50_mean']:.3f} | "
            + (f"{row['gain']:+.3f} | {spread_text(row)} | {row['paired_gain_mean']:+.3f} ± {row['paired_gain_std']:.3f} | "
               f"{interval(row.get('paired_gain_ci95'))} | {row['seeds_above_alone']}/{len(row['paired_gains'])} | {gap} | "
               f"{row['tune_paired_gain_mean']:+.3f} ({row['tune_seeds_above_alone']}/{len(row['paired_gains'])}) | " if "gain" in row else "– | – | – | – | – | – | – | ")
            + (f"{c['distill_over_alone']:.2f}× | {c['without_teacher_over_alone']:.2f}× | {100 * c['terms_over_alone']:.1f}% |" if c else "– | – | – |")
        )
    chosen = ", ".join(f"{teacher}: `{slug}`" for teacher, slug in (summary.get("selected_on_tune") or {}).items())
    if any("large_APs" in row for row in summary["rows"].values()):
        lines += ["", f"The same checkpoints on the larger report split ({summary['settings'].get('large_val')} images):", "",
                  "| row | AP (mean ± std) | APs per seed | paired gain (± std) | 95% interval | seeds up |", "|---|---:|---|---:|---:|---:|"]
        for slug, row in summary["rows"].items():
            if "large_APs" not in row:
                continue
            ci = row.get("large_paired_gain_ci95")
            gain = (f"{row['large_paired_gain_mean']:+.3f} ± {row['large_paired_gain_std']:.3f} | {interval(ci)} | "
                    f"{sum(d > 0 for d in row['large_paired_gains'])}/{len(row['large_paired_gains'])} |") if "large_paired_gains" in row else "– | – | – |"
            lines.append(f"| `{slug}` | {row['large_AP_mean']:.3f} ± {row['large_AP_std']:.3f} | {' / '.join(f'{a:.3f}' for a in row['large_APs'])} | {gain}")
    lines += [f"\n{line}" for line in versus_lines(summary)]
    lines.append(f"\nChosen on the tuning split (largest paired gain there, per teacher): {chosen or 'none'}.")
    for teacher_slug, t in (summary.get("inference") or {}).items():
        lines.append(f"\nInference at batch {t['batch_size']} ({t['threads']} thread(s), eval mode, features + head + postprocess, median): teacher `{teacher_slug}` "
                     f"({t['teacher_backbone']}) {1000 * t['teacher_s']:.0f} ms; its architecture on the student's {t['student_backbone']} "
                     f"{1000 * t['teacher_arch_student_backbone_s']:.0f} ms; the distilled student (`{t['row']}`, seed 0) {1000 * t['student_s']:.0f} ms: "
                     f"**{t['speedup_vs_teacher']:.2f}x** faster than the teacher, **{t['speedup_vs_teacher_arch_same_backbone']:.2f}x** than its architecture on the same backbone.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="minutes: tiny data, 2 epochs, 1 seed (= --profile quick)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full", help="full: students 8 epochs; long: 16")
    parser.add_argument("--reuse", type=Path, default=None, help="benchmark folder whose data, teachers and caches to reuse (same data and teacher settings)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/sparse_gain-<profile>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's, 0,1,2 for full)")
    parser.add_argument("--only", default=None, help="comma-separated rows by slug: " + ",".join(r.slug for r in ROWS))
    parser.add_argument("--no-cost", action="store_true", help="skip the step-time measurements (the summary reports no cost)")
    parser.add_argument("--cost-only", action="store_true", help="time the rows' steps on the trained teachers, train no student; writes <name>-cost.json")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--name", default="sparse_gain", help="file name of the summary (<name>.json, <name>.md) in the output folder: several summaries of one folder (other rows or seeds) side by side")
    parser.add_argument("--large-val", type=int, default=0, help="also score every final checkpoint on this many more scenes (generator seed 2): a report, not a selection")
    parser.add_argument("--cost-from", type=Path, default=None,
                        help="sparse_gain.json of another profile whose step costs to report (same student, batch and teachers: a step costs the same however many there are)")
    parser.add_argument("--dataset", choices=sorted(GENERATORS), default="scenes",
                        help="built-in data to generate: scenes (10 classes, 1-4 objects) or clutter (20 classes, many small, occluded)")
    args = parser.parse_args(argv)
    profile_name = "quick" if args.quick else args.profile
    profile = dict(PROFILES[profile_name], dataset=args.dataset)
    if args.seeds:
        profile["seeds"] = [int(s) for s in args.seeds.split(",")]
    rows = select_rows(parser, args.only, ROWS)
    suffix = "" if args.dataset == "scenes" else f"-{args.dataset}"  # scenes keeps its folder names
    out = args.out or Path(__file__).parent / "results" / f"sparse_gain-{profile_name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        link_shared(out, args.reuse)
    torch.set_num_threads(args.threads)
    wanted = {r.teacher for r in rows if r.teacher}
    teachers = train_teachers(out, profile, args.threads, wanted | {REFINED[t][0] for t in wanted if t in REFINED})
    if args.cost_only:
        cost = measure_cost(out, profile, args.threads, rows, args.repeats)
        atomic_write_text(out / f"{args.name}-cost.json", json.dumps(cost, indent=2, sort_keys=True) + "\n")
        print_costs(cost)
        return cost
    if args.large_val:
        profile["large_val"] = args.large_val
    large = large_data(out, profile, args.large_val) if args.large_val else None
    results = train_rows(out, profile, args.threads, rows, large)
    if args.no_cost:
        cost = None
    elif args.cost_from:
        cost = json.loads(args.cost_from.read_text())["cost"]
    else:
        cost = measure_cost(out, profile, args.threads, rows, args.repeats)
    summary = summarise(teachers, results, rows, cost)
    summary["inference"] = {} if args.no_cost else measure_inference(out, profile, args.threads, summary["selected_on_tune"], args.repeats)
    summary.update(profile=profile_name, settings=profile, cost=cost, cost_source=str(args.cost_from or "measured in this call"), command=command_line(), torch=torch.__version__)
    atomic_write_text(out / f"{args.name}.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(out / f"{args.name}.md", markdown_table(summary))
    print_tables(summary)
    console.print(f"written to {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return summary


if __name__ == "__main__":
    main()
