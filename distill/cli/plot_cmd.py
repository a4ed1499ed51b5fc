"""``detkd plot``: training curves of one run, or of several runs overlaid."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import app, user_errors
from distill.errors import ConfigError


@app.command("plot")
@user_errors
def plot_command(
    runs: list[Path] = typer.Argument(..., help="Run folders (train or distill); several are overlaid, one colour each."),
    out: Path = typer.Option(None, "--out", help="Folder for curves.png (default: the run folder; needed with several runs)."),
) -> None:
    """Loss terms per step (raw faint, smoothed), val AP per evaluation and lr, as curves.png."""
    from distill.checkpoint import make_dir
    from distill.outputs import check_output_folder
    from distill.report import console
    from distill.viz.curves import CURVES_PNG, plot_curves, read_curves

    curves = [read_curves(run) for run in runs]  # every run readable before anything is written
    if out is None:
        if len(runs) > 1:
            raise ConfigError(f"{len(runs)} runs are overlaid in one picture: pass --out DIR for it")
        out = runs[0]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file; curves.png goes into a folder")
    check_output_folder(out)
    path = plot_curves(curves, make_dir(out) / CURVES_PNG)
    console.print(f"curves written to {path}", markup=False, highlight=False)
