"""``detkd show``: one dataset image as the distillation sees it."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import app, user_errors


@app.command("show")
@user_errors
def show_command(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint) or checkpoint file of the student."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or dataset YAML."),
    image: int = typer.Option(..., "--image", help="COCO image id in --split."),
    teacher: Path = typer.Option(None, "--teacher", help="Teacher checkpoint or run folder (default: the one a distill run recorded)."),
    split: str = typer.Option("val", "--split"),
    out: Path = typer.Option(None, "--out", help="PNG file (default: RUN/show-IMAGE.png)."),
    score_thresh: float = typer.Option(0.3, "--score-thresh", help="Draw detections above this score."),
) -> None:
    """Student and teacher predictions beside the ground truth, with what the distillation reads.

    Dense students: the recipe's regions as heat maps per FPN level. Sparse students: its matched
    pairs as linked boxes. Generated anchors when the student has an anchor generator.
    """
    from distill.errors import ConfigError
    from distill.outputs import check_output_file, data_roots
    from distill.report import console
    from distill.viz.show_data import build_view
    from distill.viz.show_draw import draw_view

    if out is None:
        folder = run if run.is_dir() else run.parent.parent if run.parent.name == "checkpoints" else run.parent
        out = folder / f"show-{image}.png"  # in the run folder, never inside its checkpoints/
    # a picture may replace a picture; never a dataset's, a checkpoint's or a run's own files
    check_output_file(out, ours=lambda p: p.suffix.lower() == ".png", roots=data_roots(data))
    if teacher is not None and not teacher.exists():
        raise ConfigError(f"{teacher}: teacher checkpoint or run folder not found")
    view = build_view(run, data, image, split, teacher)
    draw_view(view, out, score_thresh)
    console.print(f"picture written to {out}", markup=False, highlight=False)
