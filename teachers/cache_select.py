"""What a teacher cache holds: the spec, its fingerprint, and the rows selected for each image.

Which locations: the regions of the distillation losses depend only on the ground truth, the
location grid and the student's grid assignment — ATSS ranks square anchors (side 8 x stride) by
centre distance and IoU with the GT, never the predictions — so for a fixed input canvas they are
fixed per (image, variant). The cache calls the student's own assignment
(``student.grid_matches``, the :class:`~distill.detector.GridAssigner` contract) and records its
``matching_config`` in the fingerprint. The cache stores the teacher's rows at the union of the recipe's
regions (``head`` rows for KD / LD, ``features`` rows for feature imitation), or at every valid
location (region ``all``, ``--dense``). The quality weight of Main LD is the *student's* score and
is computed at train time; it needs no caching.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distill.detector import GridAssigner
from distill.errors import ConfigError
from distill.pairers import RegionPairer
from distill.regions import Region, create_region
from teachers.cache_format import FORMAT, VARIANTS, VERSION, canvas_for, covers, file_sha256, region_to_json, regions_json, state_sha256

_WEIGHT_HASHES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class CacheSpec:
    """What to cache. Input size, normalisation and box policy come from the dataset's transform.

    variants:        deterministic variants, a subset of ("none", "hflip").
    head_regions:    regions whose class / bin logits are stored (empty: no head rows).
    feature_regions: regions whose FPN feature vectors are stored (empty: no features).
    size_divisor:    the canvas is the input size rounded up to it (the recipe's data.size_divisor).
    queries:         a sparse teacher's cache: every query row and its matches
                     (``teachers.cache_queries``) instead of dense regions (both region lists empty).

    Which student assignment selects dense locations is given to ``build_cache`` (its ``matcher``).
    """

    variants: tuple[str, ...] = VARIANTS
    head_regions: tuple[Region, ...] = (create_region("main"), create_region("vlr"))
    feature_regions: tuple[Region, ...] = ()
    size_divisor: int = 32
    queries: bool = False

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"cache variants must be distinct names from {', '.join(VARIANTS)}, got {', '.join(self.variants) or 'none'}")
        if self.queries and (self.head_regions or self.feature_regions):
            raise ConfigError("a query cache (sparse teacher) stores every query row: it takes no head or feature regions")
        if not self.queries and not self.head_regions and not self.feature_regions:
            raise ConfigError("a teacher cache needs head regions, feature regions, or both")
        # Canonical order, so that the same request always gives the same fingerprint.
        object.__setattr__(self, "variants", tuple(v for v in VARIANTS if v in self.variants))


def cached_region(loss, part: str) -> Region:
    """The dense region whose teacher rows of ``part`` ("head" / "features") ``loss`` reads from a
    cache: its pairer's, or every valid location for a part it reads as whole maps (``loss.whole_maps``)."""
    return create_region("all") if part in loss.whole_maps else loss.pairer.region


def spec_from_recipe(recipe, variants: tuple[str, ...] | None = None, dense: bool = False) -> CacheSpec:
    """The cache a distillation recipe needs: its losses' regions per part and its flips."""
    from distill.losses import loss_from_spec

    head, feats, matched = [], [], []
    for i, spec in enumerate(recipe.losses):
        try:
            loss = loss_from_spec(spec)
        except ConfigError as exc:
            raise ConfigError(f"recipe {recipe.name}: losses[{i}]: {exc}") from None
        if not isinstance(loss.pairer, RegionPairer):  # a matched pairer: served by a query cache
            matched.append((i, loss))
            continue
        (head if "head" in loss.needs else []).append(cached_region(loss, "head"))
        (feats if "features" in loss.needs else []).append(cached_region(loss, "features"))
    if matched and (head or feats or any("features" in loss.needs for _, loss in matched)):
        i, loss = matched[0]
        raise ConfigError(
            f"recipe {recipe.name}: losses[{i}] ({loss.name}) pairs with {loss.pairer.name!r}: a teacher cache holds either dense "
            "regions (a dense teacher) or query rows (a sparse teacher, prediction losses only), not both"
        )
    if matched:
        variants = variants if variants is not None else tuple(v for v, drawn in (("none", recipe.data.hflip_prob < 1.0), ("hflip", recipe.data.hflip_prob > 0.0)) if drawn)
        return CacheSpec(variants, (), (), recipe.data.size_divisor, queries=True)
    if not head and not feats:
        raise ConfigError(f"recipe {recipe.name} has no distillation losses: there is nothing to cache")
    if dense:
        head = [create_region("all")] if head else []
        feats = [create_region("all")] if feats else []
    if variants is None:
        p = recipe.data.hflip_prob
        variants = tuple(v for v, drawn in (("none", p < 1.0), ("hflip", p > 0.0)) if drawn)
    # several losses often share a region (Main LD and Main KD): store and fingerprint it once
    return CacheSpec(variants, tuple(dict.fromkeys(head)), tuple(dict.fromkeys(feats)), recipe.data.size_divisor)


def serves(spec: CacheSpec, recipe) -> bool:
    """Whether a cache built with ``spec`` holds everything ``recipe``'s losses read: the same kind
    (dense regions or query rows), every region per part, every flip variant the recipe draws, and
    no loss or pairer that no cache can serve (``cache_refusal``)."""
    from distill.losses import loss_from_spec

    try:
        need = spec_from_recipe(recipe)
        losses = [loss_from_spec(s) for s in recipe.losses]
    except ConfigError:
        return False
    if any(loss.cache_refusal or loss.pairer.cache_refusal for loss in losses) or need.queries != spec.queries or not set(need.variants) <= set(spec.variants):
        return False
    held_head, held_feats = [region_to_json(r) for r in spec.head_regions], [region_to_json(r) for r in spec.feature_regions]
    return all(covers(held_head, r) for r in need.head_regions) and all(covers(held_feats, r) for r in need.feature_regions)


def recipes_served(spec: CacheSpec) -> list[str]:
    """The shipped distillation recipes a cache built with ``spec`` serves (:func:`serves`)."""
    from recipes import list_recipes, load_recipe

    served = []
    for name in list_recipes():
        recipe = load_recipe(name)
        if recipe.kind == "distill" and serves(spec, recipe):
            served.append(name)
    return served


def teacher_sha256(model: nn.Module) -> str:
    """:func:`state_sha256` of a (frozen) teacher, computed once per model object."""
    if model not in _WEIGHT_HASHES:
        _WEIGHT_HASHES[model] = state_sha256(model)
    return _WEIGHT_HASHES[model]


def annotations_sha256(path: Path) -> str:
    """sha256 of an annotation file, computed once per (path, size, mtime): COCO train is ~450 MB."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(Path(path))
    return _FILE_HASHES[key]


def require_grid_assigner(matcher) -> GridAssigner:
    """The student whose assignment selects the cached locations; a clear error when it has none."""
    if not isinstance(matcher, GridAssigner):
        name = getattr(matcher, "config", {}).get("name", type(matcher).__name__)
        raise ConfigError(
            f"student {name!r} has no grid assignment (grid_matches): a dense-region teacher cache selects the locations a "
            "dense student's own assigner marks, so it needs a dense student"
        )
    return matcher


def fingerprint(teacher, dataset, spec: CacheSpec, matcher) -> dict[str, Any]:
    """Everything the cached rows depend on. ``teacher``: FrozenTeacher; ``dataset``: CocoDetection;
    ``matcher``: the student whose ``grid_matches`` selects the locations (None for a query cache).

    Sections ``teacher``, ``data`` and ``input`` must equal the run's; ``selection`` and ``variants``
    must cover what the run asks for. Paths are not part of it: a moved dataset stays valid.
    """
    transform = dataset.transform
    index = teacher.class_index
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "float16",
        "teacher": {
            "weights_sha256": teacher_sha256(teacher.model),
            "num_classes": int(teacher.num_classes),
            "reg_max": None if teacher.spec.bins is None else teacher.spec.bins - 1,
            "strides": [int(s) for s in teacher.strides],
            "fpn_channels": teacher.spec.fpn_channels,
            "class_index": None if index is None else [int(i) for i in index.tolist()],
            # named only off the default grid, so caches built before grids had names keep their fingerprint
            **({"grid": teacher.spec.grid} if teacher.spec.grid != "centre" else {}),
        },
        "data": {
            "annotations_sha256": annotations_sha256(dataset.ann_file),
            "classes": list(dataset.classes),
            "images": len(dataset),
            "invalid_boxes": dataset.invalid_boxes,
        },
        "input": {
            "size": transform.size,
            "mean": list(transform.mean),
            "std": list(transform.std),
            "size_divisor": spec.size_divisor,
            "canvas": list(canvas_for(transform.size, spec.size_divisor)),
        },
        "selection": {
            "head": regions_json(list(spec.head_regions)),
            "features": regions_json(list(spec.feature_regions)),
            **(
                {"queries": True, "teacher_config": teacher.model.config}  # its matcher's settings live there
                if spec.queries
                else {"assigner": dict(require_grid_assigner(matcher).matching_config)}
            ),
        },
        "variants": list(spec.variants),
    }
