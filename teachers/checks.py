"""Checks that a checkpoint fits a dataset or a student (classes, strides, bins, channels)."""
from __future__ import annotations

from distill.errors import CheckpointError


def check_same_classes(model_classes: list[str], data_classes: list[str], what: str, where: str) -> None:
    """The model's class list must equal the dataset's, name by name and in order."""
    if list(model_classes) == list(data_classes):
        return
    only_model = [c for c in model_classes if c not in data_classes]
    only_data = [c for c in data_classes if c not in model_classes]
    detail = f"only in the model: {only_model[:5]}, only in the data: {only_data[:5]}" if only_model or only_data else "same names, different order"
    raise CheckpointError(f"{what}: classes do not match {where} ({detail})")
