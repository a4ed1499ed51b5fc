"""Training curves of one or several runs from their ``metrics.jsonl``: every loss term per step
(raw curve faint, smoothed curve on top, log scale when the values span decades), val AP per
evaluation, and the learning rate. Several runs share every panel, one colour each (a student
trained alone against the same student distilled)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.errors import ConfigError
from distill.viz.figures import new_figure, save_png

CURVES_PNG = "curves.png"
PANEL_PX = (330, 230)  # width, height of one panel
COLUMNS = 4
LOG_SPAN = 30.0  # max / min of a positive curve above which its axis is logarithmic
SMOOTH_POINTS = 25  # the smoothing window is about 1/25 of the curve
VAL_KEYS = ("AP", "AP50")


@dataclass
class RunCurves:
    """What one run's ``metrics.jsonl`` holds, per name: (steps, values)."""

    label: str
    terms: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # "loss", "loss_*"
    lr: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    val: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def read_curves(run: Path, label: str | None = None) -> RunCurves:
    """The curves of run folder ``run``; ConfigError (one line naming it) when it is not a run."""
    from distill.engine.run import read_run_info
    from distill.engine.run_state import read_metrics

    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: is a file, not a run folder" if run.exists() else f"{run}: run folder not found")
    info = read_run_info(run)
    records = read_metrics(run)
    if not records:
        raise ConfigError(f"{run}: the run has no metrics yet ({run / 'metrics.jsonl'} is missing or empty)")
    curves = RunCurves(label or f"{run.name} ({info.get('kind', 'train')})")
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        if isinstance(record.get("val"), dict):
            for key in VAL_KEYS:
                _append(curves.val, key, step, record["val"].get(key))
            continue
        for key, value in record.items():
            if key == "loss" or key.startswith("loss_"):
                _append(curves.terms, key, step, value)
        if _finite(record.get("lr")):
            curves.lr[0].append(step)
            curves.lr[1].append(float(record["lr"]))
    return curves


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _append(table: dict, key: str, step: int, value) -> None:
    if _finite(value):
        steps, values = table.setdefault(key, ([], []))
        steps.append(step)
        values.append(float(value))


def smooth(values: list[float], window: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average with time constant ``window`` (default: about
    1/25 of the curve): the smoothed value at step t only reads steps <= t, so a curve's last point
    is never pulled by steps it has not reached."""
    x = np.asarray(values, dtype=np.float64)
    window = window or max(1, len(x) // SMOOTH_POINTS)
    if window <= 1 or len(x) == 0:
        return x
    beta = 1.0 - 1.0 / window
    out, acc, norm = np.empty_like(x), 0.0, 0.0
    for i, v in enumerate(x):
        acc, norm = beta * acc + (1 - beta) * v, beta * norm + (1 - beta)
        out[i] = acc / norm
    return out


def wants_log(values: list[float]) -> bool:
    """Log scale for a positive curve spanning more than ``LOG_SPAN`` (a loss falling by decades)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def _term_order(names: set[str]) -> list[str]:
    """The total first, then the detector's and the distillation terms in name order."""
    return sorted(names, key=lambda n: (n != "loss", n))


def plot_curves(runs: list[RunCurves], path: Path, title: str | None = None) -> Path:
    """One PNG: a panel per loss term (union over ``runs``), val AP, lr; one colour per run.

    ``title``: of a single run's picture (default: its label).
    """
    terms = _term_order({name for run in runs for name in run.terms})
    panels = terms + ["val AP", "lr"]
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    fig = new_figure(PANEL_PX[0] * columns, PANEL_PX[1] * rows + 50)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
        if name == "val AP":
            _plot_val(ax, runs, colours)
        elif name == "lr":
            for run, colour in zip(runs, colours):
                ax.plot(*run.lr, color=colour, lw=1.2)
            ax.set_xlabel("step", fontsize=7)
        else:
            _plot_term(ax, [(run.terms.get(name), colour) for run, colour in zip(runs, colours)])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(runs) == 1:  # one run: its name is the title; several: a legend of their colours
        fig.suptitle(title or runs[0].label, fontsize=10)
    else:
        handles = [axes[0].plot([], [], color=c, lw=2)[0] for c in colours]
        fig.legend(handles, [run.label for run in runs], loc="outside upper center", ncol=min(len(runs), 4), fontsize=8, frameon=False)
    return save_png(fig, path)


def _plot_term(ax, curves: list) -> None:
    values = [v for curve, _ in curves if curve for v in curve[1]]
    for curve, colour in curves:
        if not curve:
            continue
        steps, raw = curve
        ax.plot(steps, raw, color=colour, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(raw), color=colour, lw=1.4)
    if wants_log(values):
        ax.set_yscale("log")


def _plot_val(ax, runs: list[RunCurves], colours: list[str]) -> None:
    for run, colour in zip(runs, colours):
        for key, style in zip(VAL_KEYS, ("-", ":")):
            if key in run.val:
                ax.plot(*run.val[key], style, color=colour, marker="o", ms=3, lw=1.2)
    if any(run.val for run in runs):
        keys = [ax.plot([], [], style, color="grey", marker="o", ms=3)[0] for style in ("-", ":")]
        ax.legend(keys, VAL_KEYS, fontsize=7, loc="lower right")
        top = max(v for run in runs for _, values in run.val.values() for v in values)
        ax.set_ylim(0, max(0.05, 1.1 * top))
    ax.set_xlabel("step", fontsize=7)


def write_run_curves(run: Path) -> Path:
    """``RUN/curves.png`` from the run's own metrics (the end of every train / distill run)."""
    return plot_curves([read_curves(run)], Path(run) / CURVES_PNG)

