"""``detkd refine``: train a RefineBox refiner on a frozen detector (``teachers.refine``)."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import AMP_HELP, DEVICE_HELP, app, user_errors
from distill.errors import ConfigError

REFINE_SET_HELP = (
    "Override a refine recipe key, e.g. --set train.lr=1e-3 --set student.params.steps=2 "
    "(refiner: steps, top_k, channels, hidden, blocks, mlp_layers, roi_size, canonical_size) (repeatable)."
)


@app.command("refine")
@user_errors
def refine_command(
    run: Path = typer.Argument(None, help="The trained detector to refine: a run folder (its best checkpoint) or a checkpoint file."),
    data: Path = typer.Option(None, "--data", help="Dataset folder or dataset YAML (the detector's classes)."),
    out: Path = typer.Option(None, "--out", help="Run folder to create for the refined detector."),
    epochs: int = typer.Option(None, "--epochs", help="Override train.epochs."),
    set_: list[str] = typer.Option([], "--set", help=REFINE_SET_HELP),
    resume: Path = typer.Option(None, "--resume", help="Continue the refine run in this folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("off", "--amp", help=AMP_HELP),
) -> None:
    """Train a box refiner on a frozen detector (any family); the run is a detector for eval, predict, cache and distill --teacher."""
    from distill.engine.refine import refine_run
    from distill.engine.run import read_run_info

    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    overrides = list(set_) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    if resume is not None:
        info = read_run_info(resume, kind="refine")
        recorded = info.get("refine") if isinstance(info.get("refine"), dict) else {}
        if not isinstance(recorded.get("detector"), str):
            raise ConfigError(f"{resume}/run.json: corrupt run.json (no refined detector path)")
        run = run or Path(recorded["detector"])
        data = data or Path(info["data"])
        out = resume
    if run is None or data is None or out is None:
        raise ConfigError("detkd refine needs RUN (the detector), --data and --out (or --resume RUN)")
    refine_run(run, data, out, overrides, resume=resume is not None, show_progress=progress, device=device, amp=amp)
