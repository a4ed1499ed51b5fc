"""What the benchmarks share: fresh runs, row selection, interleaved timing, the tuning and larger
report splits, and paired-gain statistics. Imported by the benchmark scripts as ``common`` (a script's
own folder is on ``sys.path``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from distill.checkpoint import atomic_write_text
from distill.data import GENERATORS
from distill.engine.demo import finished
from distill.structures import DenseOutputs, HeadStages


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a benchmark table: a run of ``recipe`` (per seed where the benchmark has seeds).

    ``teacher``: the teacher's slug in the benchmark's own table (None: the student alone);
    ``losses``: recipe terms used in place of the recipe's own (None keeps them);
    ``baseline``: the slug of the row whose runs of the same seed this row's paired gains are taken against;
    ``default``: run without ``--only``.
    """

    name: str
    slug: str
    recipe: str
    overrides: tuple[str, ...] = ()
    teacher: str | None = None
    losses: tuple[dict, ...] | None = None
    baseline: str | None = None
    default: bool = True


def command_line() -> str:
    """The command that made a record, as it was typed (``python benchmarks/x.py ...``)."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def fresh(run: Path) -> bool:
    """True when ``run`` must be trained; an interrupted run is started again rather than mixed."""
    if finished(run) is not None:
        return False
    if run.exists():
        shutil.rmtree(run)
    return True


def select_rows(parser: argparse.ArgumentParser, only: str | None, rows: list[Row]) -> list[Row]:
    """The rows named in ``--only`` (comma-separated slugs); without it, the default rows."""
    if not only:
        return [row for row in rows if row.default]
    wanted = only.split(",")
    unknown = set(wanted) - {row.slug for row in rows}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {[row.slug for row in rows]}")
    return [row for row in rows if row.slug in wanted]


def interleaved_medians(fns: dict, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each function, run in turn within every repeat: a shared, noisy machine then
    slows all of them alike and their ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def optimizer_step(step_fn, student, batch, optimizer):
    """A closure for :func:`interleaved_medians`: one training step of ``step_fn``'s summed terms."""

    def run():
        terms = step_fn(student, batch)
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()

    return run


def leaf_predictions(preds):
    """A copy whose float tensors are fresh leaves: the terms' backward then stops at the head outputs."""
    leaf = lambda t: t.detach().requires_grad_() if t is not None and t.is_floating_point() else t  # noqa: E731
    bins = None if preds.bins is None else dataclasses.replace(preds.bins, logits=leaf(preds.bins.logits))
    out = dataclasses.replace(preds, logits=leaf(preds.logits), boxes=leaf(preds.boxes), bins=bins, aux=[leaf_predictions(a) for a in preds.aux])
    if isinstance(preds, DenseOutputs) and preds.stages is not None:  # the tower maps CrossKD crosses: leaves too
        stages = preds.stages
        out.stages = HeadStages([[leaf(m) for m in level] for level in stages.cls], [[leaf(m) for m in level] for level in stages.reg])
    crossing = getattr(preds, "crossing", None)
    if crossing is not None:  # the query state CrossKD for queries crosses: a leaf too
        out.crossing = dataclasses.replace(crossing, content=leaf(crossing.content))
    return out


def generated(folder: Path, dataset: str, train: int, val: int, size: int, seed: int) -> Path:
    """``folder`` holding built-in data (``GENERATORS[dataset]``: scenes or clutter), generated unless
    a previous call (or an interrupted one that got as far as val.json, written last) made it."""
    if not (folder / "val.json").is_file():
        GENERATORS[dataset](folder, num_train=train, num_val=val, size=size, seed=seed)
    return folder


def profile_data(out: Path, profile: dict) -> Path:
    """The train / val data of a benchmark profile (generator seed 0)."""
    return generated(out / "data", profile.get("dataset", "scenes"), profile["train"], profile["val"], profile["size"], seed=0)


def tune_data(out: Path, profile: dict) -> Path:
    """The tuning split: scenes from another generator seed (1; train and val use 0), as many images
    as val. Rows are compared and the one to recommend is chosen on it; val only reports them."""
    return generated(out / "data-tune", profile.get("dataset", "scenes"), 0, profile["val"], profile["size"], seed=1)


def large_data(out: Path, profile: dict, count: int) -> Path:
    """A larger report split (``--large-val``): ``count`` scenes of generator seed 2, same objects and
    textures as val. Evaluation only: a 100-image val moves one run's AP by ~0.02 with the scenes it
    is scored on, so the same checkpoints are also scored on more images."""
    return generated(out / f"data-large{count}", profile.get("dataset", "scenes"), 0, count, profile["size"], seed=2)


def heldout_metrics(run: Path, split: Path, name: str = "tune") -> dict:
    """COCO metrics of a finished run's final checkpoint on the val split of dataset ``split`` (the
    tuning split or the larger report split; computed once, kept in the run as ``<name>.json``)."""
    from distill.checkpoint import resolve_checkpoint
    from distill.data import DetectionTransform, load_dataset
    from distill.engine.evaluate import evaluate_detector
    from students.saved import load_detector

    record = run / f"{name}.json"
    if not record.is_file():
        model, meta = load_detector(resolve_checkpoint(run / "checkpoints" / "last.safetensors"))
        dataset = load_dataset(split, "val", DetectionTransform(meta["image_size"], hflip_prob=0.0))
        atomic_write_text(record, json.dumps(evaluate_detector(model, dataset), indent=2, sort_keys=True) + "\n")
    return json.loads(record.read_text())


def paired_gains(runs: list[dict], baseline: list[dict], split=lambda r: r["final"]) -> list[float]:
    """Per-seed AP differences of ``runs`` to the ``baseline`` runs of the same seed, on ``split``
    (val by default; ``r["tune"]``, ``r["large"]`` for the other splits)."""
    base = {r["seed"]: split(r)["AP"] for r in baseline}
    return [split(r)["AP"] - base[r["seed"]] for r in runs if r["seed"] in base]


def gain_interval(diffs: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean of paired gains (Student's t, n - 1 degrees of freedom):
    the gain is beyond the seed spread when the interval excludes 0. None below two seeds."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.mean(diffs)
    return (mean - half, mean + half)


def row_recipe(row: Row, sets: list[str]):
    """The row's recipe with ``sets`` applied and its ``losses`` in place of the recipe's own (None:
    keep the recipe's): a student recipe plus terms is a distillation recipe."""
    from distill.config import apply_overrides, read_yaml, recipe_from_dict
    from recipes import recipe_path

    path = recipe_path(row.recipe)
    raw = apply_overrides(read_yaml(path), [*row.overrides, *sets])
    if row.losses is not None:
        raw["losses"] = [dict(term) for term in row.losses]
    return recipe_from_dict(raw, str(path))
