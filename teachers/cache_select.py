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

import torch
from torch import Tensor, nn

from distill.detector import GridAssigner
from distill.errors import ConfigError
from distill.ops.grid import valid_locations
from distill.pairers import RegionPairer
from distill.regions import Region, create_region
from distill.structures import Batch, Matches, Target
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
        region = loss.pairer.region
        (head if "head" in loss.needs else []).append(region)
        (feats if "features" in loss.needs else []).append(region)
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


def selection(regions: tuple[Region, ...], points: Tensor, strides: Tensor, targets: list[Target], matches: Matches, valid: Tensor) -> Tensor:
    """(B, N) bool: the union of the regions' non-zero locations."""
    mask = torch.zeros_like(valid)
    for region in dict.fromkeys(regions):  # equal regions once
        mask |= region(points, strides, targets, matches, valid) > 0
    return mask


def flat_features(features: list[Tensor]) -> Tensor:
    """Per level (B, C_f, H_l, W_l) -> (B, N, C_f) in DenseOutputs flatten order."""
    channels = {f.shape[1] for f in features}
    if len(channels) != 1:
        raise ConfigError(f"caching teacher features needs the same channel count on every FPN level, got {sorted(channels)}")
    return torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)


def split_rows(select: Tensor, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """select (B, N) bool, tensors (B, N, ...) -> per image (loc (n_b,) int32, rows (n_b, ...) fp16, ...)."""
    b_idx, n_idx = select.nonzero(as_tuple=True)  # row-major: image by image, locations ascending
    gathered = [t[b_idx, n_idx].half() for t in tensors]
    for t in gathered:
        if not torch.isfinite(t).all():
            raise ConfigError("teacher outputs overflow float16 (|value| > 65504); the cache cannot store them")
    sizes = select.sum(dim=1).tolist()
    parts = [n_idx.to(torch.int32).split(sizes)] + [t.split(sizes) for t in gathered]
    return [tuple(p[b] for p in parts) for b in range(select.shape[0])]


@torch.inference_mode()
def teacher_rows(
    teacher, matcher: GridAssigner, batch: Batch, spec: CacheSpec, points: Tensor, strides: Tensor, level_sizes: list[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """Run the teacher on a canvas-padded batch; per image the selected rows (CPU, fp16).

    Each dict may hold ``head.loc`` (n,) int32, ``head.cls`` (n, C), ``head.reg`` (n, 4, K),
    ``feat.loc`` (m,) int32 and ``feat.rows`` (m, C_f).
    """
    model = teacher.model
    features = model.features(batch.images)
    matches = matcher.grid_matches(points, strides, level_sizes, batch.targets, batch.image_sizes)  # the student's own
    valid = valid_locations(points, batch.image_sizes, len(batch))
    rows: list[dict[str, Tensor]] = [{} for _ in range(len(batch))]
    if spec.head_regions:
        outputs = model.head(features, batch.image_sizes)
        cls = outputs.logits  # (B, N, C_t)
        if teacher.class_index is not None:  # columns in the student's class order, as FrozenTeacher.inputs
            cls = cls.index_select(2, teacher.class_index.to(cls.device))
        select = selection(spec.head_regions, points, strides, batch.targets, matches, valid)
        for entry, (loc, c, r) in zip(rows, split_rows(select, cls, outputs.bin_logits)):
            entry.update({"head.loc": loc.cpu(), "head.cls": c.cpu(), "head.reg": r.cpu()})
    if spec.feature_regions:
        select = selection(spec.feature_regions, points, strides, batch.targets, matches, valid)
        for entry, (loc, f) in zip(rows, split_rows(select, flat_features(features))):
            entry.update({"feat.loc": loc.cpu(), "feat.rows": f.cpu()})
    return rows
