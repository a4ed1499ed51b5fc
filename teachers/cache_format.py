"""On-disk format of a teacher cache: manifest, shards, checksums and the fingerprint.

A cache is a folder::

    CACHE/manifest.json              format, version, fingerprint (+ its sha256 "key"), layout,
                                     image ids, and one record per complete shard (file, sha256, bytes)
    CACHE/shard-00000.safetensors    the teacher rows of dataset images [0, K) x every variant
    CACHE/shard-00001.safetensors    images [K, 2K) ...
    CACHE/summary.json               what the build printed (timings, bytes per image); informational

Every shard holds an ``entries`` table (E, 6) int64: image id, variant code, and the start and count
of each of the entry's two row parts; what the parts hold is the layout's (``teachers.cache_layout``:
``dense`` region rows, ``teachers.cache_dense``; ``queries`` query rows and matches,
``teachers.cache_queries``), whose docstrings list the tensors.

Rows of one entry are contiguous. Every file is written to a temporary name
and renamed (``atomic_write``); the manifest is rewritten after each shard, so a build interrupted
at any point resumes after its last complete shard. Safetensors are parsed without pickle, and a
shard's sha256 and size are checked before its rows are used.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from distill.checkpoint import atomic_write_bytes
from distill.errors import CheckpointError
from distill.regions import REGIONS, Region, create_region

FORMAT = "detkd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
VARIANTS = ("none", "hflip")  # variant code = index in this tuple
_HASH_CHUNK = 1 << 22


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def variant_code(flipped: bool) -> int:
    return 1 if flipped else 0


# ---------------------------------------------------------------------------------------- hashes
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) in name order.

    The teacher's identity, independent of the checkpoint file's metadata (step, metrics, paths).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        if flat.numel():
            digest.update(memoryview(flat.view(torch.uint8).numpy()))  # the bytes in place, no copy
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------- regions
def region_to_json(region: Region) -> dict[str, Any]:
    """A region with every option spelled out, so ``vlr`` and ``vlr(gamma=0.25)`` compare equal."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(REGIONS[region.name]).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return {"name": region.name, "params": {**defaults, **dict(region.params)}}


def region_from_json(entry: dict[str, Any]) -> Region:
    return create_region(entry["name"], **entry.get("params", {}))


def regions_json(regions: list[Region]) -> list[dict[str, Any]]:
    """Canonical, de-duplicated, sorted: the form stored in the fingerprint."""
    unique = {json.dumps(region_to_json(r), sort_keys=True): region_to_json(r) for r in regions}
    return [unique[k] for k in sorted(unique)]


def covers(cached: list[dict[str, Any]], region: Region) -> bool:
    """Whether a cache selected with ``cached`` regions holds every location ``region`` can ask for."""
    wanted = region_to_json(region)
    return any(entry["name"] == "all" or entry == wanted for entry in cached)


# ---------------------------------------------------------------------------------------- layout
def canvas_for(image_size: int, size_divisor: int) -> tuple[int, int]:
    """The fixed (height, width) every cached image is padded to: the longer side rounded up."""
    side = math.ceil(image_size / size_divisor) * size_divisor
    return side, side


# -------------------------------------------------------------------------------------- manifest
# mkstemp creates 0600 files; a cache is read by other processes (DDP ranks, other users' runs).
READABLE = 0o644


def write_json(path: Path, obj: Any, indent: int = 1) -> None:
    """Atomically, readable by others, keys sorted (same object, same bytes)."""
    data = (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, data, mode=READABLE)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json(folder / MANIFEST, manifest)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a cache folder; anything else is a one-line CheckpointError."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: teacher cache not found")
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a teacher cache (no {MANIFEST}); build one with 'detkd cache'")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable cache manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: cache format version {manifest.get('version')} is not the supported {VERSION}; rebuild it with 'detkd cache'"
        )
    if manifest.get("key") != json_sha256(manifest.get("fingerprint")):
        raise CheckpointError(f"{path}: the manifest's fingerprint does not match its key (edited or corrupted)")
    return manifest


# ---------------------------------------------------------------------------------------- shards
def write_shard(folder: Path, k: int, tensors: dict[str, torch.Tensor], key: str) -> dict[str, Any]:
    """Serialize, checksum and atomically write shard ``k``; returns its manifest record."""
    data = save_bytes(tensors, metadata={"detkd_cache": json.dumps({"key": key, "shard": k}, sort_keys=True)})
    atomic_write_bytes(folder / shard_name(k), data, mode=READABLE)
    return {"file": shard_name(k), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def check_shard_size(folder: Path, record: dict[str, Any]) -> None:
    """A missing or truncated shard, found without reading it."""
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: cache shard is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"{path}: cache shard is {size} bytes, the manifest says {record['bytes']} (truncated or overwritten)")


def check_shard(folder: Path, record: dict[str, Any]) -> None:
    """Size, then sha256 of the whole file: a flipped byte anywhere is found and the file named."""
    check_shard_size(folder, record)
    path = Path(folder) / record["file"]
    if file_sha256(path) != record["sha256"]:
        raise CheckpointError(f"{path}: cache shard checksum mismatch (corrupted); rebuild the cache")


def open_shard(folder: Path, record: dict[str, Any]):
    """A safetensors handle on a shard (memory-mapped; slices read only the rows asked for)."""
    path = Path(folder) / record["file"]
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable cache shard ({exc})") from None
