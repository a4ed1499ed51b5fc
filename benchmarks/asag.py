"""One decoder layer against six: ASAG-S vs the multi-stage sparse model, DAB-DETR with one layer vs
six, and Group DETR's effect on both six-layer models.

    python benchmarks/asag.py            # full profile (about an hour on 2 CPU cores)
    python benchmarks/asag.py --quick    # minutes: smaller data, shorter schedule

In one run, on the same scenes data, backbone (ResNet-10t, random init), FPN (P3-P5, 32 channels),
input size (128 px) and schedule (the recipes' AdamW lr 2e-3, cosine):

- ``asag-gen``: ASAG-S fed by the Adaptive Sparse Anchor Generator (``asag_s_gen``), one layer;
- ``asag-learned``: the same one-layer student on 50 learned anchors (``asag-s-tiny``);
- ``sparse6``: the 6-stage sparse model on the same 50 learned anchors (``sparse6-tiny``);
- ``sparse6-group3``: the same with Group DETR, 3 query groups in training (one at inference);
- ``dab6`` / ``dab6-group3`` / ``dab1``: DAB-DETR (``dab6-tiny``: the same backbone and levels, 32-wide
  tokens, no encoder) on 50 learned anchors with six decoder layers, six with Group DETR (3 groups),
  and one layer (same parts, ``decoder_layers=1``).

Each is trained with ``detkd train`` semantics (``train_run``; a run folder with a summary is
reused, so an interrupted benchmark resumes), then its inference time is measured (eval mode,
batch 16, median of interleaved repeats: ``features`` + ``head`` + ``postprocess``), plus, for the
generator-fed student, the anchors per val image and the generator's share of inference time.
Prints a table and writes ``asag.json`` in the output folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (  # the benchmarks' shared helpers (this script's folder is on sys.path)
    Row,
    command_line,
    fresh,
    interleaved_medians,
    profile_data,
    select_rows,
)
from rich.console import Console
from rich.table import Table

from distill.checkpoint import atomic_write_text
from distill.data.loader import collate
from distill.engine.build import build_datasets
from distill.engine.demo import finished
from distill.engine.run import train_run
from recipes import load_recipe

PROFILES = {
    "full": {"train": 400, "val": 100, "size": 128, "epochs": 16},
    "quick": {"train": 64, "val": 32, "size": 128, "epochs": 2},
}
DAB50 = ("student.params.num_queries=50",)
ROWS = [
    Row("ASAG-S, generator anchors, 1 layer", "asag-gen", "asag-s-tiny", ("student.name=asag_s_gen",)),
    Row("ASAG-S, 50 learned anchors, 1 layer", "asag-learned", "asag-s-tiny"),
    Row("6-stage sparse, 50 learned anchors", "sparse6", "sparse6-tiny"),
    Row("  same, Group DETR (3 groups)", "sparse6-group3", "sparse6-tiny", ("student.params.groups=3",)),
    Row("DAB-DETR, 50 anchors, 6 layers", "dab6", "dab6-tiny", (*DAB50, "student.params.groups=1")),
    Row("  same, Group DETR (3 groups)", "dab6-group3", "dab6-tiny", (*DAB50, "student.params.groups=3")),
    Row("DAB-DETR, 50 anchors, 1 layer", "dab1", "dab6-tiny", (*DAB50, "student.params.groups=1", "student.params.decoder_layers=1")),
]
# Each row's six-layer references (its own family's first), for the speed-up and AP-difference columns;
# the one-layer ASAG-S rows are also set against six-layer DAB-DETR, the detector ASAG compresses.
REFERENCE = {"asag-gen": ("sparse6", "dab6"), "asag-learned": ("sparse6", "dab6"), "sparse6-group3": ("sparse6",), "dab1": ("dab6",), "dab6-group3": ("dab6",)}
console = Console(width=150)


def train_rows(out: Path, profile: dict, threads: int, rows: list[Row]) -> dict[str, dict]:
    data = profile_data(out, profile)
    runs = {}
    for row in rows:
        run = out / row.slug
        sets = [*row.overrides, f"data.image_size={profile['size']}", f"train.epochs={profile['epochs']}", f"train.threads={threads}", "train.eval_every=1000"]
        recipe = load_recipe(row.recipe, sets)
        if fresh(run):
            console.print(f"[bold]{row.name}[/] -> {run}")
            train_run(recipe, data, run)
        summary = finished(run)
        runs[row.slug] = {"name": row.name, "recipe": recipe, "run": run, "final": summary["final"], "seconds": summary["seconds"]}
    return runs


@torch.inference_mode()
def inference_times(runs: dict[str, dict], data: Path, repeats: int, batch_size: int) -> dict[str, dict]:
    """Median seconds per batch of each trained model, repeats interleaved across models."""
    from students.saved import load_detector

    first = next(iter(runs.values()))
    _, val = build_datasets(first["recipe"], data)
    batch = collate([val[i] for i in range(min(batch_size, len(val)))])
    models = {slug: load_detector(r["run"] / "checkpoints" / "last.safetensors")[0].eval() for slug, r in runs.items()}
    def infer(model):
        return lambda: model.postprocess(model.head(model.features(batch.images), batch.image_sizes), batch.image_sizes)

    fns = {slug: infer(model) for slug, model in models.items()}
    if "asag-gen" in models:  # the anchor generator alone, on the generator model's features
        features = models["asag-gen"].features(batch.images)
        fns["generator"] = lambda: models["asag-gen"].query_source(features, batch.image_sizes)
    medians = interleaved_medians(fns, repeats=repeats, warmup=2)
    out = {slug: {"inference_s": medians[slug]} for slug in models}
    if "asag-gen" in models:
        model = models["asag-gen"]
        anchors = []
        for start in range(0, len(val), batch_size):
            b = collate([val[i] for i in range(start, min(start + batch_size, len(val)))])
            anchors += model.query_source(model.features(b.images), b.image_sizes).valid.sum(dim=1).tolist()
        out["asag-gen"].update(
            generator_s=medians["generator"], generator_share=medians["generator"] / out["asag-gen"]["inference_s"],
            anchors_per_image_mean=statistics.mean(anchors), anchors_per_image_min=min(anchors), anchors_per_image_max=max(anchors),
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="minutes instead of an hour: less data, 2 epochs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/asag-<profile>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default=None, help="comma-separated rows by slug (default: all): " + ",".join(r.slug for r in ROWS))
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "full"
    profile = PROFILES[name]
    out = args.out or Path("benchmarks/results") / f"asag-{name}"
    torch.set_num_threads(args.threads)
    runs = train_rows(out, profile, args.threads, select_rows(parser, args.only, ROWS))
    timing = inference_times(runs, out / "data", args.repeats, 16)
    rows = {slug: {"name": r["name"], "AP": r["final"]["AP"], "AP50": r["final"]["AP50"], "train_seconds": r["seconds"], **timing[slug]} for slug, r in runs.items()}
    summary = {"profile": {"name": name, **profile}, "threads": args.threads, "rows": rows}
    for slug, refs in REFERENCE.items():
        for ref in (r for r in refs if slug in rows and r in rows):
            if "group" not in slug:  # a group row has the same inference path as its reference
                rows[slug][f"speedup_vs_{ref}"] = rows[ref]["inference_s"] / rows[slug]["inference_s"]
            rows[slug][f"AP_minus_{ref}"] = rows[slug]["AP"] - rows[ref]["AP"]
    summary["command"] = command_line()
    atomic_write_text(out / "asag.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    print_table(summary)
    console.print(f"written to {out / 'asag.json'}")
    return summary


def print_table(summary: dict) -> None:
    p = summary["profile"]
    table = Table(title=f"asag ({p['name']}): {p['train']}/{p['val']} scenes at {p['size']} px, {p['epochs']} epochs, {summary['threads']} threads")
    for column in ("model", "AP", "AP50", "inference / batch 16", "speed-up vs 6 layers", "AP - 6 layers", "anchors / image", "generator share"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for slug, row in summary["rows"].items():
        refs = REFERENCE.get(slug, ())
        fmt = lambda key, f: f.format(row[key]) if key in row else "-"  # noqa: E731
        per_ref = lambda key, f: ", ".join(f"{f.format(row[key + r])} ({r})" for r in refs if key + r in row) or "-"  # noqa: E731
        anchors = f"{row['anchors_per_image_mean']:.1f} ({row['anchors_per_image_min']}-{row['anchors_per_image_max']})" if "anchors_per_image_mean" in row else "-"
        table.add_row(
            row["name"], f"{row['AP']:.4f}", f"{row['AP50']:.4f}", f"{1000 * row['inference_s']:.0f} ms", per_ref("speedup_vs_", "{:.2f}x"),
            per_ref("AP_minus_", "{:+.4f}"), anchors, fmt("generator_share", "{:.0%}"),
        )
    console.print(table)


if __name__ == "__main__":
    main()
