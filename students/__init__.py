"""Student detectors behind a timm-style registry.

>>> from students import create_student, list_students
>>> model = create_student("gfl_resnet18", num_classes=10)
>>> model.config   # {"name": "gfl_resnet18", "params": {...}}: create_student(**) rebuilds it

Every student implements the detector contract (``distill.detector``): dense GFL
(``students.gfl.detector.GFL``) and sparse query detectors (``students.asag.model.SparseDetector``).
"""
from students.registry import create_student, is_student, list_students, register_student, student_entrypoint

from students import gfl  # noqa: E402,F401  (registers the GFL family)
from students import asag  # noqa: E402,F401  (registers the sparse ASAG family)

__all__ = ["create_student", "is_student", "list_students", "register_student", "student_entrypoint"]
