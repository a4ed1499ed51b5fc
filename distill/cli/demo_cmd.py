"""``detkd demo``: generate the embedded data, train a small GFL, evaluate it, draw predictions."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import app, user_errors


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the data, the run and the pictures."),
    recipe: str = typer.Option("gfl-demo", "--recipe", help="Recipe to train."),
    epochs: int = typer.Option(None, "--epochs", help="Override the recipe's epochs."),
    train_images: int = typer.Option(480, "--train", help="Training scenes to generate."),
    val_images: int = typer.Option(96, "--val", help="Validation scenes to generate."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The whole pipeline on the embedded data in a few minutes on 2 CPU cores."""
    import json

    from distill.data import generate_scenes
    from distill.engine.predict import predict_images
    from distill.engine.report import console
    from distill.engine.run import train_run
    from recipes import load_recipe

    overrides = [f"train.seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
    resolved = load_recipe(recipe, overrides)
    data = out / "data"
    if not (data / "train.json").is_file():
        generate_scenes(data, num_train=train_images, num_val=val_images, size=resolved.data.image_size, seed=seed)
    run = out / "run"
    result = train_run(resolved, data, run, resume=False, show_progress=progress)
    val_images_paths = sorted(json.loads((data / "val.json").read_text())["images"], key=lambda im: im["id"])[:4]
    pictures = predict_images(run, [data / "images" / im["file_name"] for im in val_images_paths], out / "predictions")
    console.print(f"val AP {result.best_ap:.3f} (best), run in {run}, predictions drawn in {pictures[0].parent}")
