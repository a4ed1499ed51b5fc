"""Build a teacher cache: run the frozen teacher once over a split, store the rows the losses need.

    spec = spec_from_recipe(load_recipe("ld-tiny"))
    summary = build_cache(teacher, train_set, "caches/ld-tiny", spec, matcher=student)

``matcher`` is the student (any dense detector with ``grid_matches``): its own assignment selects
the locations, so the cache holds exactly the rows its regions will ask for.

Images are processed in shards of ``shard_size`` dataset images (every variant of an image lives
in the same shard), each padded to the cache canvas and run in batches of ``batch_size``. After
each shard the shard file and then the manifest are written atomically, so rerunning the same build
resumes after the last complete shard — and writes the same bytes as an uninterrupted build — while
a folder holding a cache with another fingerprint is refused.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distill import distributed as dist
from distill.checkpoint import make_dir
from distill.data.loader import collate
from distill.errors import CheckpointError, ConfigError, OutputError
from distill.report import console, make_progress
from teachers.cache_dense import DenseLayout  # noqa: F401  (registers the dense layout)
from teachers.cache_format import (
    FORMAT,
    MANIFEST,
    SUMMARY,
    VERSION,
    check_shard,
    json_sha256,
    read_manifest,
    variant_code,
    write_json,
    write_manifest,
    write_shard,
)
from teachers.cache_layout import LAYOUTS, layout_from_manifest
from teachers.cache_queries import QueryLayout  # noqa: F401  (registers the query layout)
from teachers.cache_select import CacheSpec, fingerprint, require_grid_assigner

DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 16


class EntryDataset(Dataset):
    """(dataset index, variant) pairs -> the exact deterministic sample ``dataset.get(i, flip)``."""

    def __init__(self, dataset, pairs: list[tuple[int, str]]) -> None:
        self.dataset, self.pairs = dataset, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int):
        index, variant = self.pairs[j]
        return self.dataset.get(index, variant == "hflip")


def shard_pairs(num_images: int, variants: tuple[str, ...], shard_size: int, k: int) -> list[tuple[int, str]]:
    """The (index, variant) entries of shard ``k``, image-major."""
    stop = min(num_images, (k + 1) * shard_size)
    return [(i, v) for i in range(k * shard_size, stop) for v in variants]


def entry_loader(dataset, shards: list[list[tuple[int, str]]], batch_size: int, canvas: tuple[int, int], num_workers: int = 0) -> DataLoader:
    """Batches of canvas-padded samples that never cross a shard boundary, in shard order."""
    pairs = [p for shard in shards for p in shard]
    batches, start = [], 0
    for shard in shards:
        batches += [list(range(start + i, start + min(i + batch_size, len(shard)))) for i in range(0, len(shard), batch_size)]
        start += len(shard)
    return DataLoader(
        EntryDataset(dataset, pairs), batch_sampler=batches, num_workers=num_workers,
        collate_fn=functools.partial(collate, pad_to=canvas),
    )


def build_cache(
    teacher,
    dataset,
    out: str | Path,
    spec: CacheSpec,
    *,
    matcher=None,
    shard_size: int | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build (or resume) the cache of ``teacher`` (FrozenTeacher) on ``dataset`` (CocoDetection) in ``out``.

    ``matcher``: the student whose grid assignment selects the locations (``GridAssigner``).
    ``on_shard(k, record)`` runs after shard ``k`` and the manifest are on disk (tests interrupt
    builds with it). ``source`` (paths, split) is stored in the manifest for people; it is not part
    of the fingerprint. Returns the summary also written to ``out/summary.json``.

    Under torchrun the shards are dealt round-robin to the ranks (each writes its own shard files,
    byte-identical to a one-process build); rank 0 alone writes the manifest, after each round, in
    shard order, so an interrupted build still resumes after the last complete shard.
    """
    out = Path(out)
    if (teacher.spec.family == "sparse") != spec.queries:
        raise ConfigError(
            f"a {teacher.spec.family} teacher is cached as " + ("query rows (its predictions are queries)" if teacher.spec.family == "sparse" else "dense regions")
        )
    if not spec.queries:
        matcher = require_grid_assigner(matcher)
    fp = fingerprint(teacher, dataset, spec, matcher)
    canvas = tuple(fp["input"]["canvas"])
    layout = LAYOUTS["queries" if spec.queries else "dense"].probe(teacher, canvas, spec)
    main, rank, world = dist.is_main(), dist.rank(), dist.world_size()
    manifest = _start_or_resume(out, fp, layout.record, dataset, shard_size, batch_size, source) if main else None
    dist.barrier()
    manifest = manifest or read_manifest(out)
    shard_size, batch_size = manifest["build"]["shard_size"], manifest["build"]["batch_size"]
    first = len(manifest["shards"])
    if manifest["complete"]:
        return {**summarize(out, manifest), "already_complete": True}
    todo = [shard_pairs(len(dataset), spec.variants, shard_size, k) for k in range(first, manifest["num_shards"])]
    mine = list(range(rank, len(todo), world))  # positions in todo of this rank's shards
    rounds = math.ceil(len(todo) / world)
    device = next(teacher.model.parameters()).device
    started = time.perf_counter()
    with make_progress(show_progress and main) as bar:
        task = bar.add_task("teacher cache", total=sum(len(todo[i]) for i in mine), info=f"shard {first}/{manifest['num_shards']}")
        keys: list[tuple[int, int]] = []
        rows: list[dict[str, Tensor]] = []
        done = 0
        for batch in entry_loader(dataset, [todo[i] for i in mine], batch_size, canvas, num_workers):
            rows += layout.batch_rows(teacher, matcher, batch.to(device), spec)
            keys += [(int(i), variant_code(bool(f))) for i, f in zip(batch.image_ids, batch.flipped.tolist())]
            bar.update(task, advance=len(batch))
            if len(keys) == len(todo[mine[done]]):  # the shard is complete: write it, then the manifest
                k = first + mine[done]
                tensors = layout.shard_tensors(keys, rows)
                try:
                    record = write_shard(out, k, tensors, manifest["key"])
                except OutputError as exc:
                    raise OutputError(
                        f"{exc}; the cache keeps its {len(manifest['shards'])} complete shards: free space and rerun the same command to resume"
                    ) from None
                head_rows, feature_rows = layout.stored_rows(rows)
                record.update(entries=len(keys), head_rows=head_rows, feature_rows=feature_rows)
                _record_round(out, manifest, record, on_shard)
                keys, rows, done = [], [], done + 1
                bar.update(task, info=f"shard {len(manifest['shards'])}/{manifest['num_shards']}")
        for _ in range(rounds - len(mine)):  # this rank has no shard in the last round
            _record_round(out, manifest, None, on_shard)
    seconds = time.perf_counter() - started
    if main and not manifest["complete"]:  # a dataset of 0 images has no shard to write
        manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
        write_manifest(out, manifest)
    summary = summarize(out, manifest, seconds=seconds, built_entries=sum(map(len, todo)), resumed_at=first)
    if main:
        write_json(out / SUMMARY, summary, indent=2)
    dist.barrier()
    return summary


def _record_round(out: Path, manifest: dict[str, Any], record: dict[str, Any] | None, on_shard) -> None:
    """Collect one round's shard records from every rank (in shard order) and write the manifest."""
    records = dist.gather_objects(record)
    for rec in records:
        if rec is None:
            continue
        manifest["shards"].append(rec)
        manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
        if dist.is_main():
            write_manifest(out, manifest)
        if on_shard is not None:
            on_shard(len(manifest["shards"]) - 1, rec)


def summarize(out: Path, manifest: dict[str, Any], seconds: float = 0.0, built_entries: int = 0, resumed_at: int = 0) -> dict[str, Any]:
    """Sizes and rates of a cache (what ``detkd cache`` prints and writes to summary.json)."""
    shards = manifest["shards"]
    entries = sum(s["entries"] for s in shards)
    total = sum(s["bytes"] for s in shards)
    dense = layout_from_manifest(manifest["layout"]).dense_bytes_per_entry()
    per_entry = total / max(entries, 1)
    return {
        "cache": str(out),
        "key": manifest["key"],
        "images": len(manifest["image_ids"]),
        "variants": manifest["fingerprint"]["variants"],
        "entries": entries,
        "shards": len(shards),
        "resumed_at_shard": resumed_at,
        "built_entries": built_entries,
        "seconds": round(seconds, 3),
        "entries_per_s": round(built_entries / seconds, 2) if seconds > 0 else None,
        "bytes": total,
        "bytes_per_entry": round(per_entry, 1),
        "dense_fp16_bytes_per_entry": dense,
        "fraction_of_dense": round(per_entry / dense, 4) if dense else None,
        "head_rows_per_entry": round(sum(s["head_rows"] for s in shards) / max(entries, 1), 2),
        "feature_rows_per_entry": round(sum(s["feature_rows"] for s in shards) / max(entries, 1), 2),
        "locations_per_entry": manifest["layout"].get("num_locations"),
    }


def _start_or_resume(out: Path, fp: dict, layout: dict, dataset, shard_size: int | None, batch_size: int | None, source: dict | None) -> dict[str, Any]:
    """A fresh manifest, or the one of an interrupted build with the same fingerprint (checked shards)."""
    key = json_sha256(fp)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest["key"] != key:
            from teachers.cache import describe_difference

            raise CheckpointError(
                f"{out}: holds a teacher cache with another fingerprint ({describe_difference(manifest['fingerprint'], fp)}); "
                "choose another --out or delete it"
            )
        for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
            if value is not None and value != manifest["build"][name]:
                raise CheckpointError(f"{out}: this cache is built with {name} {manifest['build'][name]}; resume it with the same value")
        _drop_bad_shards(out, manifest)
        _remove_temporaries(out)
        return manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: folder exists and is not a teacher cache; choose a new --out")
    shard_size = shard_size or DEFAULT_SHARD_SIZE
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if shard_size < 1 or batch_size < 1:
        raise CheckpointError(f"shard size and batch size must be >= 1, got {shard_size} and {batch_size}")
    manifest = {
        "format": FORMAT, "version": VERSION, "key": key, "fingerprint": fp, "layout": layout,
        "build": {"shard_size": shard_size, "batch_size": batch_size},
        "image_ids": [int(i) for i in dataset.image_ids],
        "num_shards": math.ceil(len(dataset) / shard_size), "shards": [], "complete": False, "source": source or {},
    }
    make_dir(out)
    write_manifest(out, manifest)
    return manifest


def _drop_bad_shards(out: Path, manifest: dict[str, Any]) -> None:
    """Keep the shards that are intact; a damaged one (and every later one) is rebuilt."""
    for k, record in enumerate(manifest["shards"]):
        try:
            check_shard(out, record)
        except CheckpointError as exc:
            console.print(f"[yellow]warning:[/] {exc}; rebuilding from shard {k}", highlight=False)
            manifest["shards"] = manifest["shards"][:k]
            manifest["complete"] = False
            break


def _remove_temporaries(out: Path) -> None:
    # atomic_write's names: ".<file>.<random>.tmp"; an interrupted build can leave one behind.
    from distill.checkpoint import remove_temp_files

    remove_temp_files(out)
