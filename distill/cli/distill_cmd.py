"""``detkd distill``: train a student with a frozen teacher."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import AMP_HELP, DEVICE_HELP, app, user_errors
from distill.cli.train_cmds import SET_HELP, resolve_recipe
from distill.errors import ConfigError


@app.command("distill")
@user_errors
def distill_command(
    recipe: str = typer.Argument(None, help="Distillation recipe name (see 'detkd recipes --kind distill') or YAML file."),
    teacher: Path = typer.Option(None, "--teacher", help="Teacher checkpoint file or run folder."),
    data: Path = typer.Option(None, "--data", help="Dataset folder or dataset YAML."),
    out: Path = typer.Option(None, "--out", help="Run folder to create for the student."),
    epochs: int = typer.Option(None, "--epochs", help="Override train.epochs."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Distill even from a teacher whose val AP is below teacher.min_ap."),
    resume: Path = typer.Option(None, "--resume", help="Continue the distillation run in this folder."),
    cache: Path = typer.Option(None, "--cache", help="Teacher cache from 'detkd cache' for this teacher and data: the teacher is not run in training steps."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("off", "--amp", help=AMP_HELP),
) -> None:
    """Distill a student from a frozen teacher (student losses + the recipe's KD / LD / feature terms)."""
    from distill.engine.run import distill_run, read_run_info

    if resume is not None:
        info = read_run_info(resume, kind="distill")
        recorded_teacher = info.get("teacher") if isinstance(info.get("teacher"), dict) else {}
        if "path" not in recorded_teacher:
            raise ConfigError(f"{resume}/run.json: corrupt run.json (no teacher path)")
        data = data or Path(info["data"])
        teacher = teacher or Path(recorded_teacher["path"])
        recorded = recorded_teacher.get("cache")
        cache = cache or (Path(recorded["path"]) if recorded else None)
        force = force or bool(recorded_teacher.get("force"))  # the run was started with --force
        out = resume
    resolved = resolve_recipe(recipe, resume, epochs, set_)
    if teacher is None or data is None or out is None:
        raise ConfigError("detkd distill needs --teacher, --data and --out (or --resume RUN)")
    distill_run(resolved, teacher, data, out, force=force, resume=resume is not None, show_progress=progress, cache=cache, device=device, amp=amp)
