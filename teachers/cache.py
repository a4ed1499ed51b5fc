"""A built teacher cache, read at train time in place of the online teacher.

    cache = TeacherCache.open("caches/ld-tiny")          # checks every shard's sha256
    distiller = Distiller(student, teacher, losses, recipe, cache=cache)
    distiller.fit(train_set, val_set, "runs/student")   # first refuses a cache that does not fit (check_run)

- :class:`TeacherCache` maps (image id, flipped) to the teacher rows of one image; shards are
  memory-mapped safetensors, only the rows of the batch are read. Nothing is written at train time,
  so every DDP rank (or any number of concurrent runs) can open the same folder.
- What an entry holds is the cache's layout (``teachers.cache_layout``), named in its manifest:
  a dense teacher's region rows (``teachers.cache_dense``) or a sparse teacher's query rows and matches
  (``teachers.cache_queries``). The store reads shards and checks fingerprints the same way for both;
  :meth:`TeacherCache.inputs` hands a batch's rows to the layout, which serves them as a
  ``DistillInputs`` (dense: :class:`~teachers.cache_dense.CachedTeacherInputs`, whose row accessors
  raise :class:`~teachers.cache_dense.CacheMissError` naming the image, variant and location a pair
  asks for and the cache does not hold; :meth:`TeacherCache.check_run` refuses such a run before it
  starts). A cache is a teacher source like the frozen teacher: ``spec`` and ``inputs(batch, student, needs)``.
- :class:`CachedVariantDataset` wraps the training split: samples are collated on the cache canvas
  (the teacher's outputs near padding depend on how much padding there is) and only cached variants
  are drawn; :meth:`TeacherCache.check_run` refuses, before training, a cache whose teacher, data,
  transform, regions or variants do not fit the run.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import Dataset

from distill.errors import CheckpointError, ConfigError, DataError
from distill.inputs import DistillInputs
from distill.structures import Batch, DetectorSpec
from teachers.cache_dense import CachedTeacherInputs, CacheMissError  # noqa: F401  (re-exported: the dense layout's rows and misses)
from teachers.cache_format import VARIANTS, check_shard, check_shard_size, open_shard, read_manifest, region_from_json, variant_code
from teachers.cache_layout import layout_from_manifest
from teachers.cache_queries import QueryLayout  # noqa: F401  (registers the query layout)
from teachers.cache_select import fingerprint


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
        self.layout = layout_from_manifest(manifest["layout"])  # what an entry holds: dense region rows or query rows
        self.kind = self.layout.kind
        self.canvas = self.layout.canvas
        self.variants = tuple(self.fingerprint["variants"])
        # part -> the cached regions as text, for the messages of cache misses (built once, not per batch)
        self.held = {"head": self.describe("head"), "feature": self.describe("features")}
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

    def held_regions(self, part: str) -> list[dict[str, Any]]:
        """The regions (as stored in the fingerprint) whose rows the cache holds for ``part``
        ("head" or "features"); none for a query cache."""
        return list(self.fingerprint["selection"].get(part, []))

    def describe(self, part: str) -> str:
        return ", ".join(str(region_from_json(r)) for r in self.held_regions(part))

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
        spec = self.layout.request(self.fingerprint, size_divisor)
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
        self.layout.check_losses(self, losses)
        missing = [v for v in drawn_variants(dataset.transform.hflip_prob) if v not in self.variants]
        if missing:
            keep = "1" if "hflip" in self.variants else "0"
            raise CheckpointError(
                f"{self.folder}: training draws variant {', '.join(missing)} (data.hflip_prob {dataset.transform.hflip_prob}) but the cache "
                f"holds {', '.join(self.variants)} only; rebuild it with --variants none,hflip or pass --set data.hflip_prob={keep}"
            )

    @property
    def spec(self) -> DetectorSpec:
        """The cached teacher as pair checks see it (classes already mapped to the student's)."""
        return self.layout.detector_spec(self.fingerprint)

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
        out = {}
        try:
            for (_, names), start, count in zip(self.layout.parts, entry[0::2], entry[1::2]):
                out.update({name: handle.get_slice(name)[start : start + count] for name in names if name in handle.keys()})
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
        """The teacher side of ``batch`` for the losses (the teacher-source protocol), served by the
        layout from the rows of the batch's image variants; ``student``: the student's side."""
        entries = [self.rows(int(i), bool(f)) for i, f in zip(batch.image_ids, batch.flipped.tolist())]
        return self.layout.inputs(self, batch, student, needs, entries)
