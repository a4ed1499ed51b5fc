"""The frozen-teacher side: loading a trained detector as a teacher, pair checks, and the teacher cache."""
from teachers.cache import CachedTeacherInputs, CachedVariantDataset, CacheMissError, TeacherCache
from teachers.cache_build import build_cache
from teachers.cache_select import CacheSpec, spec_from_recipe
from teachers.checks import check_pair, check_same_classes, class_index_for
from teachers.frozen import FrozenTeacher, freeze, load_teacher

__all__ = [
    "FrozenTeacher", "freeze", "load_teacher", "check_pair", "check_same_classes", "class_index_for",
    "TeacherCache", "CachedTeacherInputs", "CachedVariantDataset", "CacheMissError", "CacheSpec", "build_cache",
    "spec_from_recipe",
]
