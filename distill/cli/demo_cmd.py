"""``detkd demo``: the whole product on the embedded data — teacher, baseline student, distilled student."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import AMP_HELP, DEVICE_HELP, app, user_errors

DEMO_ENTRIES = ("data", "teacher", "baseline", "distilled", "predictions", "demo.json")


def is_demo_folder(folder: Path) -> bool:
    """A folder an earlier ``detkd demo`` wrote (it is continued): only the demo's own entries."""
    return all(entry.name in DEMO_ENTRIES or entry.name.startswith(".") for entry in folder.iterdir())


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the data, the three runs and the pictures."),
    recipe: str = typer.Option("pkd-demo", "--recipe", help="Distill recipe; its teacher.recipe trains the teacher."),
    epochs: int = typer.Option(None, "--epochs", help="Override the student's epochs (baseline and distilled)."),
    teacher_epochs: int = typer.Option(None, "--teacher-epochs", help="Override the teacher's epochs."),
    train_images: int = typer.Option(480, "--train", help="Training scenes to generate."),
    val_images: int = typer.Option(96, "--val", help="Validation scenes to generate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and of every run."),
    force: bool = typer.Option(False, "--force", help="Distill even from a teacher below the recipe's teacher.min_ap."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("off", "--amp", help=AMP_HELP),
) -> None:
    """Train a teacher, the student alone, and the student distilled; compare them (about 9 min on 2 CPU cores)."""
    import json

    from distill.engine.demo import run_demo
    from distill.engine.device import make_runtime
    from distill.engine.predict import predict_images
    from distill.errors import ConfigError
    from distill.outputs import check_output_folder
    from distill.report import console, metrics_table
    from recipes import load_recipe

    make_runtime(device, amp)  # --device cuda without CUDA, --amp fp16 on the CPU: refused before any data is generated
    check_output_folder(out, owned=is_demo_folder)
    student_sets = [f"train.seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
    resolved = load_recipe(recipe, student_sets)
    if resolved.teacher is None or not resolved.teacher.recipe:
        raise ConfigError(f"detkd demo: recipe {resolved.name} names no teacher.recipe to train the teacher with")
    teacher_sets = [f"train.seed={seed}"] + ([f"train.epochs={teacher_epochs}"] if teacher_epochs is not None else [])
    teacher_recipe = load_recipe(resolved.teacher.recipe, teacher_sets)
    result = run_demo(out, resolved, teacher_recipe, train_images, val_images, seed, force=force, show_progress=progress, device=device, amp=amp)

    data = out / "data"
    val_images_paths = sorted(json.loads((data / "val.json").read_text())["images"], key=lambda im: im["id"])[:4]
    pictures = predict_images(out / "distilled", [data / "images" / im["file_name"] for im in val_images_paths], out / "predictions", device=device)
    rows = {f"{name} ({result['seconds'][name]:.0f} s)": metrics for name, metrics in result["final"].items()}
    console.print(metrics_table(f"detkd demo: {resolved.name} on {train_images}/{val_images} scenes, val after the last epoch", rows, ["AP", "AP50", "AP75", "AR100"]))
    gap = result["gap_closed"]
    gain = result["final"]["distilled"]["AP"] - result["final"]["baseline"]["AP"]
    closed = "n/a (the teacher is not better than the baseline)" if gap is None else f"{100 * gap:.0f}%"
    console.print(f"distillation: {gain:+.3f} AP over the baseline, teacher-student gap closed {closed}")
    console.print(f"runs in {out}, summary {out / 'demo.json'}, predictions drawn in {pictures[0].parent}", markup=False)
