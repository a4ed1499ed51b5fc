"""``detkd train``, ``detkd eval`` and ``detkd predict``."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from distill.cli.app import AMP_HELP, DEVICE_HELP, app, user_errors
from distill.errors import ConfigError

SET_HELP = "Override a recipe key, e.g. --set train.lr=0.01 --set student.params.fpn_channels=64 (repeatable)."


def resolve_recipe(recipe: str | None, resume: Path | None, epochs: int | None, overrides: list[str]):
    """The recipe of a new run, or the stored recipe of the run being resumed (plus overrides)."""
    from recipes import load_recipe

    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    overrides = list(overrides) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    if resume is not None:
        stored = Path(resume) / "recipe.yaml"
        if not stored.is_file():
            raise ConfigError(f"{resume}: cannot resume, no recipe.yaml in the run folder")
        return load_recipe(stored, overrides)
    if recipe is None:
        raise ConfigError("missing RECIPE (a name from 'detkd recipes' or a .yaml file)")
    return load_recipe(recipe, overrides)


@app.command("train")
@user_errors
def train_command(
    recipe: str = typer.Argument(None, help="Recipe name (see 'detkd recipes') or a YAML file."),
    data: Path = typer.Option(None, "--data", help="Dataset folder (train.json, val.json, images/) or dataset YAML."),
    out: Path = typer.Option(None, "--out", help="Run folder to create."),
    epochs: int = typer.Option(None, "--epochs", help="Override train.epochs."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: str = typer.Option("off", "--amp", help=AMP_HELP),
) -> None:
    """Train a detector from a recipe (no teacher). Under torchrun: DDP, --set train.batch_size is the global batch."""
    from distill.engine.run import read_run_info, train_run

    if resume is not None:
        data = data or Path(read_run_info(resume, kind="train")["data"])
        out = resume
    resolved = resolve_recipe(recipe, resume, epochs, set_)
    if data is None or out is None:
        raise ConfigError("detkd train needs --data and --out (or --resume RUN)")
    train_run(resolved, data, out, resume=resume is not None, show_progress=progress, device=device, amp=amp)


@app.command("eval")
@user_errors
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file or run folder (uses its best checkpoint), a `detkd export` .onnx file, or an external teacher (tv:ARCH=WEIGHTS, hf:FOLDER)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or dataset YAML."),
    split: str = typer.Option("val", "--split", help="Split to evaluate."),
    out: Path = typer.Option(None, "--out", help="JSON file for the metrics (default: next to the checkpoint)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    class_agnostic: bool = typer.Option(
        False, "--class-agnostic", help="Match boxes regardless of class: separates class confusion from localization."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that is not an eval record of detkd."),
    image_size: int = typer.Option(None, "--image-size", help="Input size of an external teacher (tv: / hf:), which records none."),
) -> None:
    """COCO metrics of a checkpoint on a dataset split."""
    from distill.checkpoint import atomic_write_text, require_meta, resolve_checkpoint
    from distill.data import DetectionTransform, load_dataset
    from distill.engine.device import resolve_device
    from distill.engine.evaluate import check_scorable, evaluate_detector
    from distill.outputs import check_output_file, data_roots
    from distill.report import console, key_value_table, make_progress
    from students.saved import load_detector
    from teachers.checks import check_same_classes

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    torch_device = resolve_device(device)
    from teachers.external import detector_for_data, parse_reference

    external = parse_reference(checkpoint)  # a torchvision / transformers teacher, classes matched to the data's by name
    if external is not None and image_size is None:
        raise ConfigError(f"{checkpoint}: an external teacher records no input size; pass --image-size")
    path = external.path if external is not None else resolve_checkpoint(checkpoint)
    suffix = "-agnostic" if class_agnostic else ""
    out = out or path.with_name(f"{path.stem}.eval-{split}{suffix}.json")
    check_output_file(out, ours=is_eval_record, overwrite=overwrite, roots=data_roots(data))
    exported = path.suffix == ".onnx"  # a `detkd export` file, run by onnxruntime (distill.export.evaluate)
    if exported:
        from distill.export.evaluate import evaluate_onnx, read_onnx_meta

        meta = read_onnx_meta(path)
    elif external is not None:
        meta = {"image_size": image_size}
    else:
        model, meta = load_detector(path)
        require_meta(meta, path, "image_size")
        model.to(torch_device)
    dataset = load_dataset(data, split, DetectionTransform(meta["image_size"], hflip_prob=0.0))
    if external is not None:
        model = detector_for_data(external, dataset.classes).to(torch_device)
    else:
        check_same_classes(meta["classes"], dataset.classes, what=str(path), where=str(data))
    check_scorable(dataset, split)
    with make_progress(progress) as bar:
        task = bar.add_task("eval", total=len(dataset), info=split)
        run = evaluate_onnx if exported else evaluate_detector
        metrics = run(
            path if exported else model, dataset, batch_size, progress=lambda done, total: bar.update(task, completed=done),
            class_agnostic=class_agnostic,
        )
    console.print(key_value_table(f"{path.name} on {data} [{split}{', class-agnostic' if class_agnostic else ''}]", metrics))
    record = {"checkpoint": str(path), "data": str(data), "split": split, "images": len(dataset),
              "class_agnostic": class_agnostic, "metrics": metrics}
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    console.print(f"metrics written to {out}", markup=False)


def is_eval_record(path: Path) -> bool:
    """Whether ``path`` is what ``detkd eval`` writes (so it may be replaced by a new evaluation)."""
    from distill.outputs import read_json

    record = read_json(path)
    return isinstance(record, dict) and {"checkpoint", "split", "metrics"} <= record.keys()


@app.command("predict")
@user_errors
def predict_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file or run folder."),
    images: list[Path] = typer.Argument(..., help="Image files."),
    out: Path = typer.Option(..., "--out", help="Folder for the annotated PNGs and detections.json."),
    score_thresh: float = typer.Option(0.3, "--score-thresh", help="Draw detections above this score."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a detections.json in --out that detkd predict did not write."),
) -> None:
    """Draw a checkpoint's detections on images (PNG per image, plus detections.json)."""
    from distill.engine.predict import predict_images

    predict_images(checkpoint, images, out, score_thresh=score_thresh, device=device, overwrite=overwrite)
