"""The dense layout of a teacher cache: a dense teacher's rows at the locations of the recipe's regions.

Which locations: the regions of the distillation losses depend only on the ground truth, the
location grid and the student's grid assignment — ATSS ranks square anchors (side 8 x stride) by
centre distance and IoU with the GT, never the predictions — so for a fixed input canvas they are
fixed per (image, variant). The build calls the student's own assignment
(``student.grid_matches``, the :class:`~distill.detector.GridAssigner` contract; its
``matching_config`` is in the fingerprint) and stores the teacher's rows at the union of the recipe's
regions (``head`` rows for KD / LD, ``feat`` rows for feature imitation), or at every valid location
(region ``all``, ``--dense``). The quality weight of Main LD is the *student's* score and is computed
at train time; it needs no caching.

Shard tensors (E entries, R head rows, F feature rows)::

    entries    (E, 6) int64   image_id, variant code, head_start, head_count, feat_start, feat_count
    head.loc   (R,)   int32   flat location of each row on the cache canvas (DenseOutputs order)
    head.cls   (R, C) fp16    class logits (already mapped to the student's classes)
    head.reg   (R, 4, K) fp16 per-edge bin logits (K = reg_max + 1)
    feat.loc   (F,)   int32   flat location of each feature row          (only with features)
    feat.rows  (F, C_f) fp16  FPN feature vector at that location          (only with features)

Rows of one entry are contiguous and sorted by location. At train time :class:`CachedTeacherInputs`
serves them to the losses as a ``DistillInputs`` of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.detector import GridAssigner
from distill.errors import CheckpointError, ConfigError
from distill.inputs import DistillInputs
from distill.ops.grid import dense_points, valid_locations
from distill.pairers import RegionPairer
from distill.regions import Region
from distill.structures import Batch, BoxBins, DenseOutputs, DetectorSpec, Matches, Target
from teachers.cache_format import covers, region_from_json
from teachers.cache_layout import CacheLayout, register_layout
from teachers.cache_select import CacheSpec, cached_region, require_grid_assigner

DENSE_PARTS = (("head", ("head.loc", "head.cls", "head.reg")), ("feat", ("feat.loc", "feat.rows")))


class CacheMissError(CheckpointError):
    """A loss asked for a teacher row at a location the cache does not hold."""


@dataclass
class CachedTeacherInputs(DistillInputs):
    """Teacher side of one batch, served from a cache. R / R_f: cached head / feature rows of the batch.

    head_index, feat_index: (B, N) row of each location in ``cls`` / ``reg`` / ``feat``, -1 where
    nothing is cached. cls (R, C), reg (R, 4, K), feat (R_f, C_f): fp32 (stored as fp16).
    points (N, 2), strides (N,): the canvas grid, the frame the cached bins are measured in (boxes
    are decoded from the bins on demand).
    """

    head_index: Tensor | None = None
    cls: Tensor | None = None
    reg: Tensor | None = None
    feat_index: Tensor | None = None
    feat: Tensor | None = None
    points: Tensor | None = None
    strides: Tensor | None = None
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    keys: list[tuple[int, bool]] = field(default_factory=list)  # (image id, flipped) per batch row
    source: str = ""
    held: dict[str, str] = field(default_factory=dict)  # part -> cached regions, for messages

    def cls_rows(self, image: Tensor, index: Tensor) -> Tensor:
        return self.cls[self._rows(self.head_index, image, index, "head")]

    def bin_rows(self, image: Tensor, index: Tensor) -> Tensor:
        return self.reg[self._rows(self.head_index, image, index, "head")]

    def bin_references(self, image: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.points[index], self.strides[index, None].expand(-1, 4)

    def box_rows(self, image: Tensor, index: Tensor) -> Tensor:
        bins = BoxBins(self.bin_rows(image, index)[None], self.points[index][None], self.strides[index][None, :, None])
        return bins.decode()[0]

    def feature_rows(self, level: int, image: Tensor | None, index: Tensor | None) -> Tensor:
        offset = sum(h * w for h, w in self.level_sizes[:level])
        h, w = self.level_sizes[level]
        if self.feat_index is None:
            raise CheckpointError(f"{self.source}: holds no teacher feature rows")
        if index is None:  # every location of the level, image-major
            level_index = self.feat_index[:, offset : offset + h * w]
            image, index = (torch.ones_like(level_index, dtype=torch.bool)).nonzero(as_tuple=True)
        return self.feat[self._rows(self.feat_index, image, index + offset, "feature")]

    def require_features(self) -> list[Tensor]:
        """The teacher's whole FPN maps, per level (B, C_f, H_l, W_l), rebuilt once per batch from the
        cached rows (for a loss reading whole maps, ``pkd``): every valid location must be cached;
        padding locations are 0 (the rows of no region)."""
        if self.features is None:
            sizes = self.feature_sizes()
            valid = valid_locations(self.points, self.image_sizes, len(self.keys), self.spec.grid)  # (B, N)
            image, location = valid.nonzero(as_tuple=True)
            flat = self.feat.new_zeros(len(self.keys), valid.shape[1], self.feat.shape[1])  # (B, N, C_f)
            flat[image, location] = self.feat[self._rows(self.feat_index, image, location, "feature")]
            maps = flat.transpose(1, 2).split([h * w for h, w in sizes], dim=2)
            self.features = [m.reshape(m.shape[0], m.shape[1], h, w) for m, (h, w) in zip(maps, sizes)]
        return self.features

    def feature_sizes(self) -> list[tuple[int, int]]:
        if self.feat_index is None:
            raise CheckpointError(f"{self.source}: holds no teacher features; rebuild it with --features (or for this recipe)")
        return list(self.level_sizes)

    def _rows(self, index_map: Tensor | None, image: Tensor, location: Tensor, part: str) -> Tensor:
        """(R,) image and flat location -> (R,) cached row ids, or CacheMissError naming the first missing one."""
        if index_map is None:
            raise CheckpointError(f"{self.source}: holds no teacher {part} rows")
        ids = index_map[image, location]
        missing = (ids < 0).nonzero(as_tuple=True)[0]
        if len(missing):
            b, n = int(image[missing[0]]), int(location[missing[0]])
            image_id, flipped = self.keys[b]
            level, y, x = self._position(n)
            raise CacheMissError(
                f"{self.source}: no cached teacher {part} row for image id {image_id} ({'hflip' if flipped else 'none'}) at "
                f"level {level} row {y} col {x}; the cache holds {part} rows for {self.held.get(part) or 'no region'} only: "
                "rebuild it for this recipe (detkd cache --recipe) or with --dense"
            )
        return ids

    def _position(self, location: int) -> tuple[int, int, int]:
        for level, (h, w) in enumerate(self.level_sizes):
            if location < h * w:
                return level, location // w, location % w
            location -= h * w
        raise IndexError(location)



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
    valid = valid_locations(points, batch.image_sizes, len(batch), teacher.spec.grid)
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


@register_layout
class DenseLayout(CacheLayout):
    """A dense teacher's rows at the locations of the recipe's regions (see the module docstring).

    Record: canvas, level_sizes, num_locations; num_classes and bins with head rows;
    feature_channels with feature rows. A probed layout also holds the canvas grid (``points``,
    ``strides``) the build selects on.
    """

    kind = "dense"
    family = "dense"
    parts = DENSE_PARTS

    def __init__(self, record: dict[str, Any], points: Tensor | None = None, strides: Tensor | None = None) -> None:
        super().__init__(record)
        self.level_sizes = [tuple(s) for s in record.get("level_sizes", [])]
        self.num_locations = int(record.get("num_locations", 0))
        self.points, self.strides = points, strides

    # ------------------------------------------------------------------------------- build
    @classmethod
    @torch.inference_mode()
    def probe(cls, teacher, canvas: tuple[int, int], spec: CacheSpec) -> "DenseLayout":
        """Level sizes, classes, bins and channels on the canvas, from one blank image."""
        model = teacher.model
        device = next(model.parameters()).device
        features = model.features(torch.zeros(1, 3, *canvas, device=device))
        level_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        record: dict[str, Any] = {"canvas": list(canvas), "level_sizes": [list(s) for s in level_sizes], "num_locations": sum(h * w for h, w in level_sizes)}
        if spec.head_regions:
            outputs = model.head(features, None)
            points, strides = outputs.points.clone(), outputs.strides.clone()
            classes = outputs.num_classes if teacher.class_index is None else len(teacher.class_index)
            record.update(num_classes=int(classes), bins=int(outputs.bins.num_bins))
        else:
            points, strides = dense_points(tuple(level_sizes), tuple(teacher.strides), device, teacher.spec.grid)
        if spec.feature_regions:
            record["feature_channels"] = int(flat_features(features).shape[-1])
        return cls(record, points, strides)

    def batch_rows(self, teacher, matcher, batch: Batch, spec: CacheSpec) -> list[dict[str, Tensor]]:
        return teacher_rows(teacher, require_grid_assigner(matcher), batch, spec, self.points, self.strides, self.level_sizes)

    def stored_rows(self, rows: list[dict[str, Tensor]]) -> tuple[int, int]:
        return sum(len(r.get("head.loc", ())) for r in rows), sum(len(r.get("feat.loc", ())) for r in rows)

    def dense_bytes_per_entry(self) -> int:
        n = self.num_locations
        head = n * (self.record["num_classes"] + 4 * self.record["bins"]) * 2 if "num_classes" in self.record else 0
        return head + n * self.record.get("feature_channels", 0) * 2

    # -------------------------------------------------------------------------------- read
    def detector_spec(self, fingerprint: dict[str, Any]) -> DetectorSpec:
        teacher = fingerprint["teacher"]
        return DetectorSpec(
            "dense", int(self.record.get("num_classes") or teacher["num_classes"]), tuple(teacher["strides"]), teacher["fpn_channels"],
            self.record.get("bins"), grid=teacher.get("grid", "centre"),
        )

    def request(self, fingerprint: dict[str, Any], size_divisor: int) -> CacheSpec:
        selection = fingerprint["selection"]
        regions = lambda part: tuple(region_from_json(r) for r in selection.get(part, []))  # noqa: E731
        return CacheSpec(tuple(fingerprint["variants"]), regions("head"), regions("features"), size_divisor)

    def check_losses(self, cache, losses) -> None:
        held = {"head": cache.held_regions("head"), "features": cache.held_regions("features")}
        for loss in losses:
            if not isinstance(loss.pairer, RegionPairer):
                raise CheckpointError(
                    f"{cache.folder}: loss '{loss.name}' pairs with {loss.pairer.name!r}, but a dense teacher cache serves the rows of "
                    "dense regions only (main, vlr, gt_boxes, all); run that loss with the online teacher"
                )
            for part, regions in held.items():
                region = cached_region(loss, part)
                if part in loss.needs and not covers(regions, region):
                    whole = " (whole maps)" if part in loss.whole_maps else ""
                    raise CheckpointError(
                        f"{cache.folder}: loss '{loss.name}' reads teacher {part} in region {region}{whole}, but the cache holds "
                        f"{part} rows for {cache.describe(part) or 'no region'} only; rebuild it with 'detkd cache --recipe RECIPE' or --dense"
                    )

    def inputs(self, cache, batch: Batch, student: DistillInputs, needs: frozenset[str], entries: list[dict[str, Tensor]]) -> DistillInputs:
        """``student``: the student's side, whose dense grid must be the cache canvas's."""
        outputs = student.predictions
        if not isinstance(outputs, DenseOutputs) or [tuple(s) for s in outputs.level_sizes] != self.level_sizes:
            grid = getattr(outputs, "level_sizes", "no dense grid")
            raise CheckpointError(
                f"{cache.folder}: the batch's location grid {grid} is not the cache's {self.level_sizes} "
                f"(canvas {self.canvas[0]}x{self.canvas[1]}); collate training batches on the cache canvas (TeacherCache.training_set)"
            )
        device = outputs.points.device
        result = CachedTeacherInputs(
            spec=cache.spec, image_sizes=batch.image_sizes, points=outputs.points, strides=outputs.strides,
            level_sizes=list(self.level_sizes), keys=[(int(i), bool(f)) for i, f in zip(batch.image_ids, batch.flipped.tolist())],
            source=str(cache.folder), held=cache.held,
        )
        if "head.loc" in entries[0] and "head" in needs:
            result.head_index, (result.cls, result.reg) = self._stack(entries, "head", device)
        if "feat.loc" in entries[0] and "features" in needs:
            result.feat_index, (result.feat,) = self._stack(entries, "feat", device)
        return result

    def _stack(self, entries: list[dict[str, Tensor]], part: str, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        """(B, N) row index (-1 = not cached) and the rows of every image concatenated, in fp32."""
        loc_name, *value_names = dict(self.parts)[part]
        locs = [e[loc_name].long() for e in entries]
        counts = torch.tensor([len(loc) for loc in locs])
        index = torch.full((len(entries), self.num_locations), -1, dtype=torch.long)
        index[torch.repeat_interleave(torch.arange(len(entries)), counts), torch.cat(locs)] = torch.arange(int(counts.sum()))
        values = [torch.cat([e[name] for e in entries]).to(device=device, dtype=torch.float32) for name in value_names]
        return index.to(device), values
