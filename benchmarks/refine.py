"""RefineBox on the scenes data: a GFL, an ASAG and a DAB-DETR detector (and, with ``--only sparse6``, a
Sparse R-CNN) before and after a box refiner.

    python benchmarks/refine.py            # full profile (hours on 2 CPU cores)
    python benchmarks/refine.py --quick    # minutes: smaller data, short schedules, one refiner seed

Each detector is trained with ``detkd train`` semantics (``train_run``), then frozen and refined with
``detkd refine`` semantics (``refine_run``: the refiner alone is trained, 3 shared-weight steps,
top-100 predictions refined at inference; for GFL after its NMS) once per refiner seed. A run folder
with a summary is reused, so an interrupted benchmark resumes.

Per detector: AP, AP75, AR100 on val before and after (the refined run's final evaluation), the
per-seed gains and their 95% interval over seeds (``common.gain_interval``: beyond the seed spread
when it excludes 0), the refiner's parameters, and the extra inference time of the refined detector
as a ratio to the detector alone (eval mode, batch 16, ``features`` + ``head`` + ``postprocess``,
medians of interleaved repeats). The refiner's lr is 1e-3, not the reference's 1e-4: its schedule
here is a few hundred steps, not 90k. Prints a table and writes ``refine.json`` in the output folder.

A refiner variant: ``--tag h16 --set student.params.hidden=16`` trains its own refiners
(``<detector>-refined-h16-s<seed>``) on the same detectors and writes ``refine-h16.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import Row, command_line, fresh, gain_interval, interleaved_medians, profile_data, select_rows  # the benchmarks' shared helpers
from rich.console import Console
from rich.table import Table

from distill.checkpoint import atomic_write_text
from distill.data import DetectionTransform, load_dataset
from distill.data.loader import collate, resolve_split
from distill.engine.demo import finished
from distill.engine.refine import refine_run
from distill.engine.run import train_run
from recipes import load_recipe

PROFILES = {
    "full": {"train": 400, "val": 100, "size": 128, "epochs": 16, "refine_epochs": 12, "seeds": 3},
    "quick": {"train": 32, "val": 16, "size": 96, "epochs": 2, "refine_epochs": 1, "seeds": 1},
}
ROWS = [
    Row("GFL (dense, refined after NMS)", "gfl", "gfl-tiny"),
    Row("ASAG-S, generator anchors, 1 layer", "asag", "asag-tiny"),
    Row("DAB-DETR, 6 layers", "dab6", "dab6-tiny"),
    Row("Sparse R-CNN, 6 stages", "sparse6", "sparse6-tiny", default=False),
]
METRICS = ("AP", "AP75", "AR100")
REFINER_LR = "train.lr=1e-3"
console = Console(width=160)


def train_detector(row: Row, out: Path, data: Path, profile: dict, threads: int) -> Path:
    """The detector of ``row``: ``out/<slug>`` (a linked run from ``--detector`` is used as it is)."""
    run = out / row.slug
    sets = [*row.overrides, f"data.image_size={profile['size']}", f"train.epochs={profile['epochs']}", f"train.threads={threads}", "train.eval_every=1000"]
    if fresh(run):
        console.print(f"[bold]{row.name}[/] -> {run}")
        train_run(load_recipe(row.recipe, sets), data, run)
    return run


def link_detectors(parser: argparse.ArgumentParser, out: Path, specs: list[str]) -> None:
    """``--detector SLUG=RUN``: link a finished run as row SLUG's detector (nothing retrained)."""
    for spec in specs:
        slug, _, run = spec.partition("=")
        if slug not in {row.slug for row in ROWS} or finished(Path(run)) is None:
            parser.error(f"--detector {spec}: expected SLUG=RUN with SLUG one of {[r.slug for r in ROWS]} and RUN a finished run")
        link = out / slug
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(Path(run).resolve(), target_is_directory=True)


def refine_detector(detector: Path, out: Path, data: Path, profile: dict, threads: int, seed: int, refiner_sets: tuple[str, ...] = (), tag: str = "") -> Path:
    run = out / f"{detector.name}-refined{'-' + tag if tag else ''}-s{seed}"
    sets = [f"train.epochs={profile['refine_epochs']}", f"train.seed={seed}", f"train.threads={threads}", "train.eval_every=1000", REFINER_LR, *refiner_sets]
    if fresh(run):
        console.print(f"  refiner seed {seed} -> {run}")
        refine_run(detector, data, run, sets, show_progress=True)
    return run


@torch.inference_mode()
def time_ratio(detector: Path, refined: Path, data: Path, repeats: int, top_ks: tuple[int, ...] = ()) -> dict[str, float]:
    """Median seconds per batch of 16 of the detector and of its refined run (and of the refined run
    refining only its top-K for each of ``top_ks``), interleaved."""
    from students.saved import load_detector

    plain, meta = load_detector(detector)
    model, _ = load_detector(refined)
    val = load_dataset(data, "val", DetectionTransform(meta["image_size"], hflip_prob=0.0))
    batch = collate([val.get(i, flip=False) for i in range(min(16, len(val)))])

    def infer(m, top_k=None):
        def run():
            if top_k is not None:
                m.top_k = top_k
            return m.postprocess(m.head(m.features(batch.images), batch.image_sizes), batch.image_sizes)
        return run

    trained_k = model.top_k
    fns = {"detector": infer(plain.eval()), "refined": infer(model.eval(), trained_k)} | {f"top{k}": infer(model, k) for k in top_ks}
    medians = interleaved_medians(fns, repeats=repeats)
    model.top_k = trained_k
    result = {"detector_s": medians["detector"], "refined_s": medians["refined"], "extra_time_ratio": medians["refined"] / medians["detector"] - 1.0}
    if top_ks:
        result["extra_time_ratio_top_k"] = {str(k): medians[f"top{k}"] / medians["detector"] - 1.0 for k in top_ks}
    return result


@torch.inference_mode()
def top_k_metrics(refined: Path, data: Path, top_k: int) -> dict:
    """Val metrics of a refined run that refines only its ``top_k`` best predictions (kept in the run)."""
    from distill.engine.evaluate import evaluate_detector
    from students.saved import load_detector

    record = refined / f"val-top{top_k}.json"
    if not record.is_file():
        model, meta = load_detector(refined)
        model.top_k = top_k
        metrics = evaluate_detector(model, load_dataset(data, "val", DetectionTransform(meta["image_size"], hflip_prob=0.0)))
        atomic_write_text(record, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return json.loads(record.read_text())


def summarize(row: Row, detector: Path, refined: list[Path], data: Path, repeats: int, top_ks: tuple[int, ...] = ()) -> dict:
    before = finished(detector)["final"]
    after = [finished(run)["final"] for run in refined]
    info = json.loads((refined[0] / "run.json").read_text())["refine"]
    result = {"name": row.name, "detector": str(detector.resolve()), "detector_recipe": finished(detector)["recipe"], "before": {k: before[k] for k in METRICS}, "after_mean": {k: statistics.mean(a[k] for a in after) for k in METRICS},
              "after_per_seed": [{k: a[k] for k in METRICS} for a in after], "refiner_parameters": info["parameters"]}
    for key in METRICS:
        gains = [a[key] - before[key] for a in after]
        result[f"{key}_gain_mean"] = statistics.mean(gains)
        result[f"{key}_gain_interval"] = gain_interval(gains)
    # Inference-only: the same refiners applied to fewer predictions (the reference refines 100).
    for k in top_ks:
        per_seed = [top_k_metrics(run, data, k) for run in refined]
        result.setdefault("top_k", {})[str(k)] = {f"{m}_gain_mean": statistics.mean(a[m] - before[m] for a in per_seed) for m in METRICS}
    result.update(time_ratio(detector, refined[0], data, repeats, top_ks))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="minutes instead of hours: less data, short schedules, one refiner seed")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/refine-<profile>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default=None, help="comma-separated rows by slug (default: all): " + ",".join(r.slug for r in ROWS))
    parser.add_argument("--detector", action="append", default=[], metavar="SLUG=RUN",
                        help="refine this finished run (trained on the same data) for row SLUG instead of training one")
    parser.add_argument("--top-k", default="", help="comma-separated: also score and time the refined runs refining only their top-K predictions")
    parser.add_argument("--data", type=Path, default=None, help="a dataset folder to use instead of generating the profile's scenes")
    parser.add_argument("--seeds", type=int, default=None, help="refiner seeds 0..N-1 per detector (default: the profile's)")
    parser.add_argument("--set", dest="refiner_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a refine-recipe override for every refiner, e.g. student.params.hidden=16 (repeatable; needs --tag)")
    parser.add_argument("--tag", default="", help="names this refiner variant: runs <detector>-refined-<tag>-s<seed>, summary refine-<tag>.json")
    args = parser.parse_args(argv)
    if args.refiner_sets and not args.tag:
        parser.error("--set needs --tag: refiners of other settings must not reuse the default refiners' run folders")
    name = "quick" if args.quick else "full"
    profile = PROFILES[name] | ({"seeds": args.seeds} if args.seeds else {})
    out = args.out or Path("benchmarks/results") / f"refine-{name}"
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or profile_data(out, profile)
    if args.data:  # the counts the table and the record state are the data's, not the profile's
        profile |= {split: len(json.loads(resolve_split(data, split)[0].read_text())["images"]) for split in ("train", "val")} | {"data": str(data)}
    link_detectors(parser, out, args.detector)
    top_ks = tuple(int(k) for k in args.top_k.split(",") if k)
    rows = {}
    for row in select_rows(parser, args.only, ROWS):
        detector = train_detector(row, out, data, profile, args.threads)
        refined = [refine_detector(detector, out, data, profile, args.threads, seed, tuple(args.refiner_sets), args.tag) for seed in range(profile["seeds"])]
        rows[row.slug] = summarize(row, detector, refined, data, args.repeats, top_ks)
    summary = {"profile": {"name": name, **profile}, "threads": args.threads, "refiner_lr": REFINER_LR, "refiner_sets": args.refiner_sets, "rows": rows,
               "command": command_line()}
    record = out / f"refine{'-' + args.tag if args.tag else ''}.json"
    atomic_write_text(record, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print_table(summary)
    console.print(f"written to {record}")
    return summary


def print_table(summary: dict) -> None:
    p = summary["profile"]
    table = Table(title=f"refine ({p['name']}): {p['train']}/{p['val']} images of {p.get('data', 'the scenes')} at {p['size']} px, detector {p['epochs']} epochs, "
                        f"refiner {p['refine_epochs']} epochs x {p['seeds']} seeds")
    for column in ("detector", "AP", "AP75", "AR100", "AP75 gain (95% CI)", "refiner params", "extra inference time"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for row in summary["rows"].values():
        cell = lambda k: f"{row['before'][k]:.4f} -> {row['after_mean'][k]:.4f}"  # noqa: E731
        interval = row["AP75_gain_interval"]
        ci = f"{row['AP75_gain_mean']:+.4f}" + (f" [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "")
        table.add_row(f"{row['name']} [{row['detector_recipe']}]", cell("AP"), cell("AP75"), cell("AR100"), ci, f"{row['refiner_parameters']:,}", f"{row['extra_time_ratio']:+.0%}")
    console.print(table)
    for row in summary["rows"].values():
        for k, gains in (row.get("top_k") or {}).items():
            console.print(f"{row['name']}: refining the top {k} only: AP {gains['AP_gain_mean']:+.4f}, AP75 {gains['AP75_gain_mean']:+.4f}, "
                          f"AR100 {gains['AR100_gain_mean']:+.4f}, extra inference time {row['extra_time_ratio_top_k'][k]:+.0%}")


if __name__ == "__main__":
    main()
