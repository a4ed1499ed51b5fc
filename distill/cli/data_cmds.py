"""``detkd data scenes``: the embedded default dataset."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import data_app, user_errors


@data_app.command("scenes")
@user_errors
def scenes_command(
    out: Path = typer.Argument(..., help="Folder to create (train.json, val.json, images/)."),
    train: int = typer.Option(400, "--train", min=1, help="Training images."),
    val: int = typer.Option(100, "--val", min=1, help="Validation images."),
    size: int = typer.Option(160, "--size", min=32, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder."),
) -> None:
    """Write a deterministic COCO dataset of scenes built from real Fashion-MNIST photographs."""
    from distill.data import generate_scenes
    from distill.report import console, key_value_table

    summary = generate_scenes(out, num_train=train, num_val=val, size=size, seed=seed, overwrite=overwrite)
    console.print(key_value_table(f"scenes written to {out}", summary))
