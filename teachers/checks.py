"""Checks that a checkpoint fits a dataset or a student (classes, strides, bins, channels)."""
from __future__ import annotations

from distill.errors import CheckpointError
from distill.structures import DetectorSpec


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


def check_pair(student: DetectorSpec, teacher: DetectorSpec, losses) -> None:
    """Every loss's pair check (pairer families and strides, classes, bins, channels), before training.

    student / teacher: ``model.spec`` / ``teacher.spec`` (a FrozenTeacher or a teacher cache). A
    mismatch fails in seconds rather than at step 1.
    """
    for loss in losses:
        loss.check_pair(student, teacher)
