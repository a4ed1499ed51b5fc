"""``detkd data scenes`` and ``detkd data clutter``: the embedded datasets."""
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


@data_app.command("clutter")
@user_errors
def clutter_command(
    out: Path = typer.Argument(..., help="Folder to create (train.json, val.json, images/)."),
    train: int = typer.Option(400, "--train", help="Training images (>= 0)."),
    val: int = typer.Option(100, "--val", help="Validation images (>= 0)."),
    size: int = typer.Option(160, "--size", help="Image side in pixels (>= 32; objects need >= 6 px)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    min_objects: int = typer.Option(8, "--min-objects", help="Objects tried per image, at least."),
    max_objects: int = typer.Option(24, "--max-objects", help="Objects tried per image, at most."),
    min_visible: float = typer.Option(0.4, "--min-visible", help="Share of its pixels every object keeps in view."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder."),
) -> None:
    """Write a deterministic COCO dataset of cluttered photos: 20 classes, many small, occluded objects.

    Real animal silhouettes and handwritten digits on real photographs; boxes fit the visible pixels.
    """
    from distill.data import generate_clutter
    from distill.report import console, key_value_table

    summary = generate_clutter(out, num_train=train, num_val=val, size=size, seed=seed,
                               min_objects=min_objects, max_objects=max_objects, min_visible=min_visible,
                               overwrite=overwrite)
    console.print(key_value_table(f"clutter written to {out}", summary))
