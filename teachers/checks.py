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


def class_index_for(student_classes: list[str], teacher_classes: list[str], class_map: dict[str, str] | None = None, where: str = "teacher") -> list[int] | None:
    """Teacher class index of every student class, matched by name (``class_map``: student -> teacher name).

    Returns None when the lists are identical (no re-indexing needed).
    """
    class_map = class_map or {}
    unknown = sorted(set(class_map) - set(student_classes))
    if unknown:
        raise CheckpointError(f"{where}: class_map names student classes that do not exist: {unknown[:5]}")
    if not class_map and list(student_classes) == list(teacher_classes):
        return None
    index, missing = [], []
    for name in student_classes:
        wanted = class_map.get(name, name)
        if wanted in teacher_classes:
            index.append(teacher_classes.index(wanted))
        else:
            missing.append(wanted)
    if missing:
        raise CheckpointError(
            f"{where}: the teacher has no class {missing[:5]} (teacher classes: {teacher_classes[:10]}); "
            "map student classes to teacher classes with teacher.class_map in the recipe"
        )
    return index


def check_pair(student, teacher, losses) -> None:
    """Strides, bins and feature channels of a student/teacher pair, against the active losses.

    Bins and channels are the losses' business (resampling, adapters): each loss that can check a
    pair does it here, before training, so a mismatch fails in seconds rather than at step 1.
    """
    if tuple(student.strides) != tuple(teacher.strides):
        raise CheckpointError(
            f"teacher strides {tuple(teacher.strides)} != student strides {tuple(student.strides)}: dense losses compare "
            "the same locations, so both detectors need the same FPN levels"
        )
    for loss in losses:
        if "head" in loss.needs and hasattr(loss, "_check_pair"):
            loss._check_pair(student.reg_max, teacher.reg_max)
        if "features" in loss.needs and hasattr(loss, "_check_channels"):
            loss._check_channels(student.fpn_channels, teacher.fpn_channels)
