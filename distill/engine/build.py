"""Build datasets, detectors and run metadata from a recipe (the glue the CLI and API share)."""
from __future__ import annotations

import platform
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.config import Recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_threads(recipe: Recipe) -> None:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)


def build_datasets(recipe: Recipe, data: str | Path):
    """(train, val) datasets; validation never flips."""
    from distill.data import DetectionTransform, load_dataset

    spec = recipe.data
    train = load_dataset(
        data, "train", DetectionTransform(spec.image_size, hflip_prob=spec.hflip_prob), invalid_boxes=spec.invalid_boxes, seed=recipe.train.seed
    )
    val = load_dataset(data, "val", DetectionTransform(spec.image_size, hflip_prob=0.0), invalid_boxes=spec.invalid_boxes, seed=recipe.train.seed)
    return train, val


def build_detector(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's student with ``num_classes`` outputs and the recipe's post-processing settings."""
    import inspect

    from students import create_student, student_entrypoint

    seed_everything(recipe.train.seed)
    params = {**recipe.student.params, "num_classes": num_classes}
    accepted = inspect.signature(student_entrypoint(recipe.student.name)).parameters
    for key in ("score_thresh", "nms_iou", "max_detections"):  # post-processing settings the detector takes
        if key in accepted:
            params.setdefault(key, getattr(recipe.eval, key))
    return create_student(recipe.student.name, **params)


def run_meta(model: nn.Module, dataset, recipe: Recipe, data: str | Path) -> dict[str, Any]:
    """Metadata stored in every checkpoint: enough to rebuild the model and map its classes."""
    return {
        "student": model.config,
        "classes": list(dataset.classes),
        "cat_ids": list(dataset.cat_ids),
        "image_size": recipe.data.image_size,
        "size_divisor": recipe.data.size_divisor,
        "data": str(Path(data).resolve()),  # absolute: a resume from another folder finds it
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
