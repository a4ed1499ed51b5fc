"""Teacher cache builds: a teacher checkpoint, a dataset and (optionally) a recipe -> a cache folder.

The library function behind ``detkd cache`` (the CLI parses its options and prints the result) and
the benchmarks: :func:`cache_plan` decides what to cache (a :class:`~teachers.CacheSpec`) and which
student's assignment selects the dense locations; :func:`build_teacher_cache` loads the teacher,
maps its classes to the data's, plans, and runs :func:`teachers.build_cache` inside a run session
(under torchrun the shards are dealt to the ranks).

    built = build_teacher_cache("runs/teacher", "data/scenes", "caches/ld", recipe=load_recipe("ld-full-feat"))
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distill.config import DataSpec, Recipe
from distill.errors import ConfigError
from distill.regions import Region, create_region


@dataclass(frozen=True)
class CacheRequest:
    """What to cache beyond (or instead of) what the recipe's losses read; None = the recipe's choice.

    variants:        deterministic variants ("none", "hflip").
    head_regions:    regions of the class / bin-logit rows.
    features:        also cache FPN feature rows.
    feature_regions: regions of the feature rows (default: the recipe's, else ``head_regions``).
    dense:           every valid location (region ``all``) instead of a selection.
    """

    variants: tuple[str, ...] | None = None
    head_regions: tuple[Region, ...] | None = None
    features: bool | None = None
    feature_regions: tuple[Region, ...] | None = None
    dense: bool = False

    @property
    def selects_locations(self) -> bool:
        return bool(self.head_regions or self.feature_regions or self.features or self.dense)


class BuiltCache(NamedTuple):
    """What a build returns: its summary (also ``out/summary.json``), the CacheSpec it built, and
    whether this process reports it (rank 0 under torchrun; the process group is gone afterwards)."""

    summary: dict[str, Any]
    spec: Any
    reports: bool


def cache_matcher(recipe: Recipe | None, num_classes: int):
    """The student whose own assignment selects the cached locations: the recipe's student (built
    without loading backbone weights: only its assigner runs), else the default ``gfl`` student."""
    from students import create_student, student_entrypoint

    name, params = ("gfl", {}) if recipe is None else (recipe.student.name, dict(recipe.student.params))
    params["num_classes"] = num_classes
    if "pretrained" in inspect.signature(student_entrypoint(name)).parameters:
        params["pretrained"] = None
    return create_student(name, **params)


def cache_plan(teacher, classes: list[str], recipe: Recipe | None = None, request: CacheRequest = CacheRequest(), where: str = ""):
    """(CacheSpec, matcher): what to cache for ``recipe`` (None: what the recommended recipe,
    ``recipes.RECOMMENDED``, reads, both flips) with this teacher (FrozenTeacher), the request's explicit choices winning; the matcher
    is the student whose assignment selects dense locations (None for a sparse teacher's query cache)."""
    from recipes import RECOMMENDED, load_recipe
    from teachers.cache_format import VARIANTS
    from teachers.cache_select import CacheSpec, spec_from_recipe

    if teacher.spec.family == "sparse":  # every query row and the teacher's matches: nothing to select
        if request.selects_locations:
            raise ConfigError(f"{where}: a sparse teacher's cache stores every query row; --regions, --features and --dense select dense locations")
        variants = request.variants or (spec_from_recipe(recipe).variants if recipe else VARIANTS)
        return CacheSpec(variants, (), (), recipe.data.size_divisor if recipe else DataSpec().size_divisor, queries=True), None
    base = spec_from_recipe(recipe or load_recipe(RECOMMENDED), variants=request.variants or (None if recipe else VARIANTS))
    head = request.head_regions or base.head_regions
    features = request.features
    if features is None:
        features = bool(base.feature_regions) or request.feature_regions is not None
    feats = (request.feature_regions or base.feature_regions or head) if features else ()
    if request.dense:
        head = (create_region("all"),) if head else ()
        feats = (create_region("all"),) if feats else ()
    spec = CacheSpec(request.variants or base.variants, tuple(head), tuple(feats), base.size_divisor)
    if spec.head_regions and teacher.spec.bins is None:  # a torchvision FCOS / RetinaNet: boxes, no bins to store
        raise ConfigError(
            f"{where}: the teacher predicts no box bins, so a cache can hold its feature rows only: build it with a --recipe whose "
            "terms read features only, or distil without --cache"
        )
    return spec, cache_matcher(recipe, len(classes))


def build_teacher_cache(
    teacher: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    recipe: Recipe | None = None,
    request: CacheRequest = CacheRequest(),
    image_size: int | None = None,
    shard_size: int | None = None,
    batch_size: int | None = None,
    workers: int = 0,
    show_progress: bool = True,
    device: str = "auto",
) -> BuiltCache:
    """Build (or resume) the cache of the teacher at ``teacher`` on ``data``'s ``split`` in ``out``.

    The output folder is probed before any work (a new folder, or the cache being resumed: same
    fingerprint, checked by ``build_cache``). Under torchrun every rank returns; rank 0 reports.
    """
    from distill import distributed as dist
    from distill.data import DetectionTransform, load_dataset
    from distill.engine.device import resolve_device
    from distill.engine.run import session
    from distill.outputs import check_output_folder, data_roots, is_cache_folder
    from teachers import build_cache, class_index_for, load_teacher

    for option, value in (("--shard-size", shard_size), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    check_output_folder(Path(out), data_roots(Path(data)), owned=is_cache_folder, self_too=False)
    torch_device = resolve_device(device)
    frozen = load_teacher(teacher).to(torch_device)
    where = str(frozen.meta.get("path", teacher))
    size = image_size or (recipe.data.image_size if recipe else frozen.meta.get("image_size"))
    if size is None:
        raise ConfigError(f"{where}: checkpoint metadata has no image_size; pass --image-size or --recipe")
    data_spec = recipe.data if recipe else DataSpec()
    dataset = load_dataset(data, split, DetectionTransform(size, hflip_prob=0.0), invalid_boxes=data_spec.invalid_boxes)
    class_map = recipe.teacher.class_map if recipe and recipe.teacher else {}
    index = class_index_for(dataset.classes, frozen.classes, class_map, where=where)
    if index is not None:
        frozen.class_index = torch.tensor(index, dtype=torch.long, device=torch_device)
    spec, matcher = cache_plan(frozen, list(dataset.classes), recipe, request, where)
    source = {"teacher": where, "data": str(data), "split": split, "recipe": recipe.name if recipe else None}
    with session(str(torch_device), "off"):  # under torchrun: shards dealt to the ranks
        summary = build_cache(
            frozen, dataset, out, spec, matcher=matcher, shard_size=shard_size, batch_size=batch_size, num_workers=workers,
            show_progress=show_progress, source=source,
        )
        reports = dist.is_main()
    return BuiltCache(summary, spec, reports)
