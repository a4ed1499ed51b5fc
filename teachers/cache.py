"""A built teacher cache, read at train time in place of the online teacher.

    cache = TeacherCache.open("caches/ld-tiny")          # checks every shard's sha256
    distiller = Distiller(student, teacher, losses, recipe, cache=cache)
    distiller.fit(train_set, val_set, "runs/student")   # first refuses a cache that does not fit (check_run)

- :class:`TeacherCache` maps (image id, flipped) to the teacher rows of one image; shards are
  memory-mapped safetensors, only the rows of the batch are read. Nothing is written at train time,
  so every DDP rank (or any number of concurrent runs) can open the same folder.
- :meth:`TeacherCache.inputs` gives a :class:`CachedTeacherInputs` — a ``DistillInputs`` whose row
  accessors (``cls_rows``, ``bin_rows``, ``box_rows``, ``feature_rows``) serve the cached rows for
  the pairs' (image, location) columns, and raise :class:`CacheMissError` naming the image, variant
  and location when a pair asks for a location the cache does not hold (a region that was not
  cached; :meth:`TeacherCache.check_run` refuses such a run before it starts). A cache is a teacher
  source like the frozen teacher: ``spec`` and ``inputs(batch, student, needs)``.
- :class:`CachedVariantDataset` wraps the training split: samples are collated on the cache canvas
  (the teacher's outputs near padding depend on how much padding there is) and only cached variants
  are drawn; :meth:`TeacherCache.check_run` refuses, before training, a cache whose teacher, data,
  transform, regions or variants do not fit the run.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import Dataset

from distill.errors import CheckpointError, ConfigError, DataError
from distill.inputs import DistillInputs
from distill.pairers import RegionPairer
from distill.regions import Region
from distill.structures import Batch, BoxBins, DenseOutputs, DetectorSpec
from teachers.cache_format import (
    VARIANTS,
    check_shard,
    check_shard_size,
    covers,
    open_shard,
    read_manifest,
    region_from_json,
    variant_code,
)
from teachers.cache_queries import QUERY_PARTS, stack_queries
from teachers.cache_select import CacheSpec, fingerprint

PARTS = {"head": ("head.loc", "head.cls", "head.reg"), "feat": ("feat.loc", "feat.rows"), **QUERY_PARTS}


class CacheMissError(CheckpointError):
    """A loss asked for a teacher row at a location the cache does not hold."""


def describe_difference(cached: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str:
    """The first differing key of two fingerprints, as ``path: cache X, now Y`` (values shortened)."""
    if isinstance(cached, dict) and isinstance(current, dict):
        for key in sorted(set(cached) | set(current)):
            if cached.get(key) != current.get(key):
                return describe_difference(cached.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
    return f"{prefix}: cache {_short(cached)}, now {_short(current)}"


def _short(value: Any) -> str:
    """A sha256 as its first 12 hex digits, anything else as a repr of at most 60 characters."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)[:60]


def drawn_variants(hflip_prob: float) -> list[str]:
    """The variants a transform with this flip probability can draw."""
    return [v for v, drawn in (("none", hflip_prob < 1.0), ("hflip", hflip_prob > 0.0)) if drawn]


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


class CachedVariantDataset(Dataset):
    """A training split restricted to a cache: cached variants only, collated on the cache canvas.

    ``pad_to`` tells :func:`distill.data.build_loader` the canvas. Flips are drawn as by the
    wrapped dataset (``flip_for``: pure in seed, epoch, index); a draw the cache cannot serve is a
    DataError (``TeacherCache.check_run`` refuses such a run before it starts). Other attributes
    (classes, cat_ids, coco, set_epoch, ...) are the wrapped dataset's.
    """

    def __init__(self, base, variants: tuple[str, ...], canvas: tuple[int, int], source: str = "") -> None:
        self.base, self.variants, self.pad_to, self.source = base, tuple(variants), tuple(canvas), source

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        flip = self.base.flip_for(index)
        if VARIANTS[variant_code(flip)] not in self.variants:
            raise DataError(
                f"{self.source}: image id {self.base.image_ids[index]} was drawn {'flipped' if flip else 'unflipped'}, "
                f"but the cache holds variants {', '.join(self.variants)} only"
            )
        return self.base.get(index, flip)

    def __getattr__(self, name: str):
        base = self.__dict__.get("base")  # absent while unpickling (DataLoader workers)
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)


class TeacherCache:
    """A complete teacher cache opened read-only. ``verify``: check every shard's sha256 now
    (otherwise sizes now, each shard's sha256 before its first use)."""

    max_open_shards = 64

    def __init__(self, folder: str | Path, manifest: dict[str, Any], verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        layout = manifest["layout"]
        self.kind = layout.get("kind", "dense")  # "dense": region rows of a dense teacher; "queries": a sparse one's
        self.canvas = tuple(layout["canvas"])
        self.level_sizes = [tuple(s) for s in layout.get("level_sizes", [])]
        self.num_locations = int(layout.get("num_locations", 0))
        self.num_classes, self.bins = layout.get("num_classes"), layout.get("bins")
        self.variants = tuple(self.fingerprint["variants"])
        selection = self.fingerprint["selection"]
        self.head_regions, self.feature_regions = selection.get("head", []), selection.get("features", [])
        self._held = {"head": self.describe("head"), "feature": self.describe("features")}  # for error messages
        shard_size = manifest["build"]["shard_size"]
        self._shard_of = {image_id: i // shard_size for i, image_id in enumerate(manifest["image_ids"])}
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._entries: dict[int, dict[tuple[int, int], list[int]]] = {}
        for record in manifest["shards"]:
            (check_shard if verify else check_shard_size)(self.folder, record)
        self._verified = set(range(len(manifest["shards"]))) if verify else set()

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "TeacherCache":
        manifest = read_manifest(Path(folder))
        if not manifest["complete"]:
            raise CheckpointError(
                f"{folder}: teacher cache is incomplete ({len(manifest['shards'])}/{manifest['num_shards']} shards); "
                "rerun the same 'detkd cache' command to finish it"
            )
        return cls(folder, manifest, verify)

    @property
    def has_head(self) -> bool:
        return bool(self.head_regions)

    @property
    def has_features(self) -> bool:
        return bool(self.feature_regions)

    def describe(self, part: str) -> str:
        regions = self.head_regions if part == "head" else self.feature_regions
        return ", ".join(str(region_from_json(r)) for r in regions)

    # ----------------------------------------------------------------------------- checks
    def check_run(self, teacher, dataset, losses, size_divisor: int, student) -> None:
        """Refuse (one CheckpointError line) a run this cache does not fit; call before training.

        teacher: FrozenTeacher (its class_index set as the run sets it); dataset: the training split;
        student: the detector being distilled (its ``grid_matches`` must be the cache's assignment).
        The fingerprint hashes the teacher's weights and the annotation file (seconds on COCO): a
        distillation runs this once (:meth:`distill.Distiller.check_cache`).
        """
        for loss in losses:
            if loss.cache_refusal:
                raise CheckpointError(f"{self.folder}: loss {loss.name!r} {loss.cache_refusal}; distil without --cache")
            if loss.pairer.cache_refusal:
                raise CheckpointError(f"{self.folder}: loss {loss.name!r} pairs with {loss.pairer}, which {loss.pairer.cache_refusal}; distil without --cache")
        if self.kind == "queries":
            spec = CacheSpec(self.variants, (), (), size_divisor, queries=True)
        else:
            spec = CacheSpec(self.variants, self._regions("head"), self._regions("features"), size_divisor)
        try:
            current = fingerprint(teacher, dataset, spec, student)
        except ConfigError as exc:
            raise CheckpointError(f"{self.folder}: {exc}") from None
        for section, what in (("format", "another format"), ("teacher", "another teacher"), ("data", "other training data"), ("input", "another input transform")):
            if current[section] != self.fingerprint[section]:
                raise CheckpointError(
                    f"{self.folder}: teacher cache was built for {what} ({describe_difference(self.fingerprint[section], current[section], section)}); "
                    "rebuild it with 'detkd cache' for this teacher, data and recipe"
                )
        if current["selection"] != self.fingerprint["selection"]:
            raise CheckpointError(
                f"{self.folder}: cache was built with {describe_difference(self.fingerprint['selection'], current['selection'], 'selection')}; "
                "rebuild it for this recipe"
            )
        if self.kind == "queries":
            self._check_query_losses(losses)
        else:
            self._check_region_losses(losses)
        missing = [v for v in drawn_variants(dataset.transform.hflip_prob) if v not in self.variants]
        if missing:
            keep = "1" if "hflip" in self.variants else "0"
            raise CheckpointError(
                f"{self.folder}: training draws variant {', '.join(missing)} (data.hflip_prob {dataset.transform.hflip_prob}) but the cache "
                f"holds {', '.join(self.variants)} only; rebuild it with --variants none,hflip or pass --set data.hflip_prob={keep}"
            )

    def _check_region_losses(self, losses) -> None:
        for loss in losses:
            if not isinstance(loss.pairer, RegionPairer):
                raise CheckpointError(
                    f"{self.folder}: loss '{loss.name}' pairs with {loss.pairer.name!r}, but a dense teacher cache serves the rows of "
                    "dense regions only (main, vlr, gt_boxes, all); run that loss with the online teacher"
                )
            region = loss.pairer.region
            for part, regions in (("head", self.head_regions), ("features", self.feature_regions)):
                if part in loss.needs and not covers(regions, region):
                    raise CheckpointError(
                        f"{self.folder}: loss '{loss.name}' reads teacher {part} in region {region}, but the cache holds "
                        f"{part} rows for {self.describe(part) or 'no region'} only; rebuild it with 'detkd cache --recipe RECIPE' or --dense"
                    )

    def _check_query_losses(self, losses) -> None:
        for loss in losses:
            if "features" in loss.needs or isinstance(loss.pairer, RegionPairer):
                raise CheckpointError(
                    f"{self.folder}: loss '{loss.name}' ({loss.pairer}) needs a dense teacher's rows or features; this cache holds a "
                    "sparse teacher's query rows and matches (for prediction losses with gt_bridged / teacher_set pairs)"
                )

    def _regions(self, part: str) -> tuple[Region, ...]:
        return tuple(region_from_json(r) for r in (self.head_regions if part == "head" else self.feature_regions))

    @property
    def spec(self) -> DetectorSpec:
        """The cached teacher as pair checks see it (classes already mapped to the student's)."""
        teacher = self.fingerprint["teacher"]
        family = "sparse" if self.kind == "queries" else "dense"
        return DetectorSpec(family, int(self.num_classes or teacher["num_classes"]), tuple(teacher["strides"]), teacher["fpn_channels"], self.bins)

    def training_set(self, dataset) -> CachedVariantDataset:
        """``dataset`` collated on the cache canvas, drawing cached variants only."""
        if isinstance(dataset, CachedVariantDataset):
            return dataset
        return CachedVariantDataset(dataset, self.variants, self.canvas, str(self.folder))

    # ------------------------------------------------------------------------------- rows
    def rows(self, image_id: int, flipped: bool) -> dict[str, Tensor]:
        """The cached rows of one image variant (CPU, fp16 values, int32 locations); see cache_format."""
        k = self._shard_of.get(int(image_id))
        if k is None:
            raise CheckpointError(f"{self.folder}: image id {image_id} is not in the cache ({len(self._shard_of)} images)")
        handle, entries = self._shard(k)
        entry = entries.get((int(image_id), variant_code(flipped)))
        if entry is None:
            raise CheckpointError(
                f"{self.folder}: image id {image_id} is not cached {'flipped' if flipped else 'unflipped'} (variants: {', '.join(self.variants)})"
            )
        first_start, first_count, second_start, second_count = entry
        parts = (("query", "match") if self.kind == "queries" else ("head", "feat"))
        out = {}
        try:
            for part, start, count in zip(parts, (first_start, second_start), (first_count, second_count)):
                if self.kind == "queries" or (part == "head" and self.has_head) or (part == "feat" and self.has_features):
                    names = [n for n in PARTS[part] if n in handle.keys()]
                    out.update({name: handle.get_slice(name)[start : start + count] for name in names})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.folder / self.manifest['shards'][k]['file']}: unreadable cache shard ({exc})") from None
        return out

    def _shard(self, k: int) -> tuple[Any, dict[tuple[int, int], list[int]]]:
        record = self.manifest["shards"][k]
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k], self._entries[k]
        if k not in self._verified:
            check_shard(self.folder, record)
            self._verified.add(k)
        handle = open_shard(self.folder, record)
        if k not in self._entries:
            try:
                table = handle.get_tensor("entries").tolist()
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.folder / record['file']}: unreadable cache shard ({exc})") from None
            self._entries[k] = {(row[0], row[1]): row[2:] for row in table}
        self._handles[k] = handle
        while len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return handle, self._entries[k]

    def inputs(self, batch: Batch, student: DistillInputs, needs: frozenset[str] = frozenset({"head"})) -> DistillInputs:
        """The teacher side of ``batch`` for the losses (the teacher-source protocol); ``student``: the
        student's side, whose dense grid must be the cache canvas's."""
        keys = [(int(i), bool(f)) for i, f in zip(batch.image_ids, batch.flipped.tolist())]
        if self.kind == "queries":  # a sparse teacher: its predictions and matches as the online teacher gives them
            predictions, matches = stack_queries([self.rows(i, f) for i, f in keys], batch.images.device)
            return DistillInputs(self.spec, predictions, None, matches, batch.image_sizes)
        outputs = student.predictions
        if not isinstance(outputs, DenseOutputs) or [tuple(s) for s in outputs.level_sizes] != self.level_sizes:
            grid = getattr(outputs, "level_sizes", "no dense grid")
            raise CheckpointError(
                f"{self.folder}: the batch's location grid {grid} is not the cache's {self.level_sizes} "
                f"(canvas {self.canvas[0]}x{self.canvas[1]}); collate training batches on the cache canvas (TeacherCache.training_set)"
            )
        device = outputs.points.device
        entries = [self.rows(i, f) for i, f in keys]
        result = CachedTeacherInputs(
            spec=self.spec, image_sizes=batch.image_sizes, points=outputs.points, strides=outputs.strides,
            level_sizes=list(self.level_sizes), keys=keys, source=str(self.folder), held=self._held,
        )
        if self.has_head and "head" in needs:
            result.head_index, (result.cls, result.reg) = self._stack(entries, "head", device)
        if self.has_features and "features" in needs:
            result.feat_index, (result.feat,) = self._stack(entries, "feat", device)
        return result

    def _stack(self, entries: list[dict[str, Tensor]], part: str, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        """(B, N) row index (-1 = not cached) and the rows of every image concatenated, in fp32."""
        loc_name, *value_names = PARTS[part]
        locs = [e[loc_name].long() for e in entries]
        counts = torch.tensor([len(loc) for loc in locs])
        index = torch.full((len(entries), self.num_locations), -1, dtype=torch.long)
        index[torch.repeat_interleave(torch.arange(len(entries)), counts), torch.cat(locs)] = torch.arange(int(counts.sum()))
        values = [torch.cat([e[name] for e in entries]).to(device=device, dtype=torch.float32) for name in value_names]
        return index.to(device), values
