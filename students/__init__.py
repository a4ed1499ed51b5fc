"""Student detectors behind a timm-style registry.

>>> from students import create_student, list_students
>>> model = create_student("gfl_resnet18", num_classes=10)
>>> model.config   # {"name": "gfl_resnet18", "params": {...}}: create_student(**) rebuilds it

Every student implements the detector contract (``distill.detector``): dense GFL
(``students.gfl.detector.GFL``) and the sparse query detectors (``students.sparse``: ASAG, Sparse R-CNN,
DAB-DETR). ``students.common`` holds what both families use; a family never imports another.
``validate_student(name, params, source)`` checks a recipe's ``student.params`` without building.
"""
from students import (
    gfl,  # noqa: E402,F401  (registers the GFL family)
    sparse,  # noqa: E402,F401  (registers the sparse query-detector family)
)
from students.registry import (
    create_student,
    is_student,
    list_students,
    register_preset,
    register_student,
    student_entrypoint,
    validate_student,
)

__all__ = [
    "create_student", "is_student", "list_students", "register_preset", "register_student", "student_entrypoint",
    "validate_student",
]
