"""The frozen-teacher side: loading a trained detector as a teacher, and pair checks."""
from teachers.checks import check_pair, check_same_classes, class_index_for
from teachers.frozen import FrozenTeacher, freeze, load_teacher

__all__ = ["FrozenTeacher", "freeze", "load_teacher", "check_pair", "check_same_classes", "class_index_for"]
