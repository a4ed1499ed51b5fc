"""Does distillation beat plain training? Teacher, baseline student and every distill recipe on scenes.

    python benchmarks/distill_gain.py            # full profile (about an hour on 2 CPU cores)
    python benchmarks/distill_gain.py --quick    # minutes: smaller data, shorter schedules, 1 seed
    python benchmarks/distill_gain.py --dataset clutter   # the same on ``detkd data clutter`` data

Steps (each skipped when its run folder already has a summary.json, so an interrupted benchmark
resumes): generate the scenes data; train the teacher (``gfl-teacher``); train the baseline student
(``gfl-student``) and distill with each recipe (same student architecture and schedule), for every
seed; then time one training step of the student alone, of distillation with the online teacher, and
of the distillation losses alone. Prints a table and writes ``distill_gain.json`` in the output folder
(``distill_gain-e<N>.json`` with ``--student-epochs N``: every student, baseline included, on that schedule).

Every run's final checkpoint is also scored on a tuning split (``data-tune``: the same generator,
seed 1; train and val use 0): the recipe to recommend is chosen there, val only reports it.

Gap closed = (recipe AP - baseline AP) / (teacher AP - baseline AP), on the mean over seeds; the
teacher's AP is that of the checkpoint the rows distil from (its best). Paired gain = a row's AP
minus the baseline's of the same seed, with a 95% Student-t interval over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from common import (
    Row,
    command_line,
    fresh,
    gain_interval,
    heldout_metrics,
    interleaved_medians,
    leaf_predictions,
    optimizer_step,
    paired_gains,
    profile_data,
    select_rows,
    tune_data,
)
from rich.console import Console
from rich.table import Table

from distill.data import GENERATORS
from distill.engine.demo import finished, gap_closed
from distill.engine.run import distill_run, train_run
from recipes import load_recipe

PROFILES = {
    "full": {"train": 600, "val": 150, "size": 128, "teacher_epochs": 24, "student_epochs": 12, "seeds": [0, 1]},
    "quick": {"train": 160, "val": 48, "size": 128, "teacher_epochs": 8, "student_epochs": 4, "seeds": [0]},
}


def scaled_weights(recipe: str, factor: float, terms: range | None = None) -> tuple[str, ...]:
    """Overrides setting the weights of ``recipe``'s distillation terms (``terms``: these indices; all by
    default) to ``factor`` times the recipe's own."""
    losses = load_recipe(recipe).losses
    return tuple(f"losses.{i}.weight={factor * losses[i].weight}" for i in (range(len(losses)) if terms is None else terms))


# Every row distils from the one GFL teacher into the baseline's student with the baseline's schedule; --only selects by slug.
TAU1 = ("losses.0.params.temperature=1", "losses.2.params.temperature=1")
VARIANTS = [
    Row("baseline (no KD)", "gfl-student", "gfl-student"),
    Row("Main LD", "ld-main", "ld-main"),
    Row("Main KD + Main LD", "ld-main-kd", "ld-main-kd"),
    Row("Main KD + Main LD + VLR LD", "ld-full", "ld-full"),
    Row("  same, tau 1 (ablation)", "ld-full-tau1", "ld-full", TAU1),
    Row("  same, tau 1, + feature mimicking", "ld-full-feat", "ld-full-feat"),
    Row("CrossKD", "crosskd", "crosskd"),
    Row("PKD", "pkd", "pkd"),
    Row("CrossKD + PKD", "crosskd-pkd", "crosskd-pkd"),
    Row("Main KD + Main LD + VLR LD + PKD", "ld-pkd", "ld-pkd"),
    # PKD's weight probed on the tuning split (the recipe ships 6); run with --only
    Row("  PKD, weight 3", "pkd-w3", "pkd", ("losses.0.weight=3",), default=False),
    Row("  PKD, weight 12", "pkd-w12", "pkd", ("losses.0.weight=12",), default=False),
    # CrossKD's crossing stage (the recipe crosses after the student's one tower block into the teacher's
    # last two); stage 0: the student's FPN maps through the teacher's whole head. Run with --only
    Row("  CrossKD, crossed at stage 0", "crosskd-stage0", "crosskd", tuple(f"losses.{i}.params.stage=0" for i in range(3)), default=False),
    # every sum of terms scored below its best part: the same sum at a half, a quarter, an eighth of its weights
    Row("  CrossKD + PKD, half weights", "crosskd-pkd-half", "crosskd-pkd", scaled_weights("crosskd-pkd", 0.5), default=False),
    Row("  CrossKD + PKD, quarter weights", "crosskd-pkd-quarter", "crosskd-pkd", scaled_weights("crosskd-pkd", 0.25), default=False),
    Row("  CrossKD + PKD, eighth weights", "crosskd-pkd-eighth", "crosskd-pkd", scaled_weights("crosskd-pkd", 0.125), default=False),
    Row("  CrossKD at half weights + PKD", "crosskd-half-pkd", "crosskd-pkd", scaled_weights("crosskd-pkd", 0.5, terms=range(3)), default=False),
]
BASELINE = VARIANTS[0]
QUICK_VARIANTS = [BASELINE, VARIANTS[5]]

console = Console()


def run_folder(out: Path, row: Row, seed: int, profile: dict) -> Path:
    """``<row>-s<seed>``, or ``<row>-e<N>-s<seed>`` on a ``--student-epochs`` schedule."""
    return out / f"{row.slug}{profile.get('run_tag', '')}-s{seed}"


def train_all(out: Path, profile: dict, variants, threads: int, student_sets: list[str], reuse: Path | None = None) -> dict:
    """Train (or reuse) data, teacher and every variant x seed; ``reuse``: a benchmark folder whose
    data and teacher are taken as they are (same scenes, same teacher, another student)."""
    torch.set_num_threads(threads)
    data = profile_data(reuse or out, profile)
    size = [f"data.image_size={profile['size']}", f"train.threads={threads}"]
    teacher = (reuse or out) / "teacher"
    if finished(teacher) is None:
        recipe = load_recipe("gfl-teacher", size + [f"train.epochs={profile['teacher_epochs']}"])
        train_run(recipe, data, teacher, resume=(teacher / "train_state.safetensors").is_file())
    results = {"teacher": finished(teacher), "runs": {}}
    tune = tune_data(reuse or out, profile)  # recipes are chosen here; val only reports
    for row in variants:
        for seed in profile["seeds"]:
            run = run_folder(out, row, seed, profile)
            if fresh(run):
                sets = size + student_sets + list(row.overrides) + [f"train.epochs={profile['student_epochs']}", f"train.seed={seed}"]
                recipe = load_recipe(row.recipe, sets)
                console.print(f"[bold]{row.name}[/] seed {seed} -> {run}")
                if recipe.kind == "distill":
                    distill_run(recipe, teacher, data, run)
                else:
                    train_run(recipe, data, run)
            results["runs"].setdefault(row.name, []).append({"seed": seed, "run": str(run), **finished(run), "tune": heldout_metrics(run, tune)})
    return results






def measure_costs(out: Path, profile: dict, threads: int, student_sets: list[str], variants) -> dict:
    """:func:`measure_cost` of every distillation recipe among ``variants`` (each recipe once)."""
    names = dict.fromkeys(row.recipe for row in variants if load_recipe(row.recipe).kind == "distill")
    return {name: measure_cost(out, profile, threads, student_sets, name) for name in names}


def measure_cost(out: Path, profile: dict, threads: int, student_sets: list[str], recipe_name: str = "ld-full-feat") -> dict:
    """Median step times of a distillation recipe: student alone, distillation with the online
    teacher, distillation losses alone (for CrossKD that includes the teacher head blocks it runs on
    the student's maps)."""
    from distill.data import DetectionTransform, collate, load_dataset
    from distill.engine.build import build_detector
    from distill.engine.distiller import Distiller
    from distill.engine.run import build_losses
    from distill.engine.trainer import build_optimizer, detector_step
    from teachers import load_teacher

    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_name, [f"data.image_size={profile['size']}", *student_sets])
    dataset = load_dataset(out / "data", "train", DetectionTransform(recipe.data.image_size))
    batch = collate([dataset[i] for i in range(recipe.train.batch_size)])
    student = build_detector(recipe, len(dataset.classes)).train()
    teacher = load_teacher(out / "teacher")
    losses = build_losses(recipe, student, teacher)
    distiller = Distiller(student, teacher, losses, recipe)
    optimizer = build_optimizer(list(student.named_parameters()), recipe)

    train_step = lambda step_fn: optimizer_step(step_fn, student, batch, optimizer)  # noqa: E731

    # The distillation terms alone: pairs, losses forward and their backward to the head outputs and
    # features (the levels are concatenated once in the head, shared with the student's own loss, so
    # that is part of the student step).
    _, features, s_in = distiller.student_side(student, batch)
    leaf_features = [f.detach().requires_grad_() for f in features]
    s_in = dataclasses.replace(s_in, predictions=leaf_predictions(s_in.predictions), features=leaf_features if s_in.features is not None else None)
    t_in = distiller.teacher_side(batch, s_in)

    def losses_only():
        sum(distiller.distillation_terms(student, leaf_features, s_in, t_in, batch).values()).backward()

    medians = interleaved_medians({"student": train_step(detector_step), "distill": train_step(distiller.step), "losses": losses_only})
    student_step, distill_step, loss_time = medians["student"], medians["distill"], medians["losses"]
    return {
        "batch_size": recipe.train.batch_size,
        "image_size": recipe.data.image_size,
        "threads": threads,
        "recipe": recipe.name,
        "student_sets": student_sets,
        "student_step_s": student_step,
        "distill_online_step_s": distill_step,
        "online_over_student": distill_step / student_step,
        "distill_losses_s": loss_time,
        "losses_over_student_step": loss_time / student_step,
    }


def summarise(results: dict, cost: dict | None) -> dict:
    """Per row: val AP (mean, std), AP on the tuning split, paired gains over the baseline of the same
    seed (val and tune, 95% interval on val) and the gap closed. The teacher's AP is its best
    checkpoint's, the checkpoint every row distils from (``resolve_checkpoint`` of the run folder).
    ``selected_on_tune``: the distill row with the largest mean paired gain on the tuning split."""
    teacher_ap = results["teacher"]["best_AP"]
    baseline = results["runs"].get(BASELINE.name)  # absent when --only leaves the baseline out
    rows = {}
    for name, runs in results["runs"].items():
        aps = [r["final"]["AP"] for r in runs]
        row = {"AP_mean": statistics.mean(aps), "AP_std": statistics.stdev(aps) if len(aps) > 1 else 0.0, "APs": aps,
               "AP50_mean": statistics.mean(r["final"]["AP50"] for r in runs), "seeds": [r["seed"] for r in runs],
               "tune_AP_mean": statistics.mean(r["tune"]["AP"] for r in runs)}
        if baseline is not None and name != BASELINE.name:
            gains = paired_gains(runs, baseline)
            tune_gains = paired_gains(runs, baseline, lambda r: r["tune"])
            row.update(paired_gains=gains, paired_gain_mean=statistics.mean(gains) if gains else None, paired_gain_ci95=gain_interval(gains),
                       tune_paired_gain_mean=statistics.mean(tune_gains) if tune_gains else None)
        rows[name] = row
    base = rows.get(BASELINE.name, {}).get("AP_mean")
    for row in rows.values():
        row["gap_closed"] = None if base is None else gap_closed(teacher_ap, base, row["AP_mean"])
    scored = {name: row["tune_paired_gain_mean"] for name, row in rows.items() if row.get("tune_paired_gain_mean") is not None}
    selected = max(scored, key=scored.get) if scored else None
    return {"teacher_AP": teacher_ap, "teacher_final": results["teacher"]["final"], "rows": rows, "cost": cost, "selected_on_tune": selected}


def print_table(summary: dict, profile_name: str) -> None:
    dataset = summary["settings"].get("dataset", "scenes")
    table = Table(title=f"distill_gain ({profile_name}): COCO AP on {dataset} val (students: final epoch; teacher: the checkpoint distilled from)")
    for column in ("setting", "AP (mean)", "± std", "AP50", "gain (95% interval)", "gap closed", "tune AP", "tune gain", "seeds"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    table.add_row("teacher (gfl-teacher)", f"{summary['teacher_AP']:.4f}", "", f"{summary['teacher_final']['AP50']:.4f}", "", "", "", "", "")
    for name, row in summary["rows"].items():
        gap = "-" if row["gap_closed"] is None else f"{100 * row['gap_closed']:.0f}%"
        ci = row.get("paired_gain_ci95")
        gain = "-" if row.get("paired_gain_mean") is None else f"{row['paired_gain_mean']:+.4f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
        tune_gain = "-" if row.get("tune_paired_gain_mean") is None else f"{row['tune_paired_gain_mean']:+.4f}"
        table.add_row(name, f"{row['AP_mean']:.4f}", f"{row['AP_std']:.4f}", f"{row['AP50_mean']:.4f}", gain, gap, f"{row['tune_AP_mean']:.4f}",
                      tune_gain, ",".join(map(str, row["seeds"])))
    console.print(table)
    console.print(f"chosen on the tuning split (largest mean paired gain there): {summary.get('selected_on_tune')}")
    costs = summary.get("cost") or {}
    if costs:
        first = next(iter(costs.values()))
        table = Table(title=f"cost per training step (batch {first['batch_size']}, {first['image_size']} px, {first['threads']} threads, median)")
        for column in ("recipe", "student alone", "distill, online teacher", "ratio", "distill losses alone", "share of student step"):
            table.add_column(column, justify="left" if column == "recipe" else "right")
        for name, cost in costs.items():
            table.add_row(name, f"{1000 * cost['student_step_s']:.0f} ms", f"{1000 * cost['distill_online_step_s']:.0f} ms",
                          f"{cost['online_over_student']:.2f}x", f"{1000 * cost['distill_losses_s']:.1f} ms", f"{100 * cost['losses_over_student_step']:.1f}%")
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="minutes instead of an hour: less data, shorter schedules, 1 seed")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/distill_gain-<profile>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cost", action="store_true", help="skip the step-time measurements")
    parser.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every student and distill recipe, e.g. student.params.backbone=mobilenetv2_100")
    parser.add_argument("--reuse", type=Path, default=None, help="benchmark folder whose data and teacher to reuse")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's, 0,1 for full)")
    parser.add_argument("--only", default=None, help="comma-separated rows to run, by slug: " + ",".join(v.slug for v in VARIANTS))
    parser.add_argument("--student-epochs", type=int, default=None,
                        help="every student's schedule (baseline and distilled alike; default: the profile's); runs go to <row>-e<N>-s<seed>")
    parser.add_argument("--dataset", choices=sorted(GENERATORS), default="scenes",
                        help="built-in data to generate: scenes (10 classes, 1-4 objects) or clutter (20 classes, many small, occluded)")
    args = parser.parse_args(argv)
    profile_name = "quick" if args.quick else "full"
    profile = dict(PROFILES[profile_name])
    if args.seeds:
        profile["seeds"] = [int(seed) for seed in args.seeds.split(",")]
    profile["dataset"] = args.dataset
    if args.student_epochs is not None and args.student_epochs != profile["student_epochs"]:
        profile["student_epochs"] = args.student_epochs
        profile["run_tag"] = f"-e{args.student_epochs}"  # beside the profile's runs in the same folder, never mixed with them
    suffix = "" if args.dataset == "scenes" else f"-{args.dataset}"  # scenes keeps its folder names
    out = args.out or Path(__file__).parent / "results" / f"distill_gain-{profile_name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    variants = QUICK_VARIANTS if args.quick and not args.only else select_rows(parser, args.only, VARIANTS)
    results = train_all(out, profile, variants, args.threads, args.student_set, args.reuse)
    cost = None if args.no_cost else measure_costs(args.reuse or out, profile, args.threads, args.student_set, variants)
    summary = summarise(results, cost)
    summary.update(profile=profile_name, settings=profile, student_sets=args.student_set, command=command_line(), torch=torch.__version__)
    written = out / f"distill_gain{profile.get('run_tag', '')}.json"
    written.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print_table(summary, profile_name)
    console.print(f"written to {written}")


if __name__ == "__main__":
    main()
