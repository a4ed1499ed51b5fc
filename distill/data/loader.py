"""Dataset specs (folder or YAML), batching and epoch-deterministic loaders.

A dataset is either a folder holding ``train.json``, ``val.json`` and ``images/``, or a YAML file
naming annotation files and image roots per split, relative to the YAML's folder (or ``root``)::

    # coco2017.yaml, next to annotations/, train2017/ and val2017/
    train: {ann_file: annotations/instances_train2017.json, image_root: train2017}
    val: {ann_file: annotations/instances_val2017.json, image_root: val2017}

Epochs: call :func:`set_epoch` (``set_epoch(loader, epoch)``) before iterating each epoch. It
sets the shuffle order of the sampler and the flip draws of the dataset, both pure functions of
``(seed, epoch)``, so a run resumed at epoch ``e`` sees exactly the batches of an unbroken run.
Workers are not persistent, so every epoch's workers receive the dataset with the epoch set.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.data.coco import CocoDetection, Sample
from distill.data.transforms import DetectionTransform, derive_seed
from distill.errors import DataError
from distill.structures import Batch

SPLITS = ("train", "val", "test")
SPEC_KEYS = ("root",) + SPLITS
SPLIT_KEYS = ("ann_file", "image_root")


def collate(samples: list[Sample], size_divisor: int = 32, pad_to: tuple[int, int] | None = None) -> Batch:
    """Stack samples into a :class:`Batch`, zero-padding at the bottom / right.

    The padded size is the largest height / width in the batch rounded up to ``size_divisor``, or
    the fixed canvas ``pad_to`` (height, width) when given; ``image_sizes`` keeps each image's
    unpadded ``(h, w)``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = [tuple(s.image.shape[1:]) for s in samples]
    pad_h = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    pad_w = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    if pad_to is not None:
        if pad_h > pad_to[0] or pad_w > pad_to[1]:
            raise ValueError(f"collate: images need a {pad_h}x{pad_w} canvas, larger than pad_to {pad_to[0]}x{pad_to[1]}")
        pad_h, pad_w = int(pad_to[0]), int(pad_to[1])
    images = samples[0].image.new_zeros(len(samples), 3, pad_h, pad_w)  # (B, 3, H, W)
    for b, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        images[b, :, :h, :w] = sample.image
    return Batch(
        images=images,
        targets=[s.target for s in samples],
        image_ids=[s.image_id for s in samples],
        image_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        scales=torch.tensor([s.scale for s in samples], dtype=torch.float32),
        flipped=torch.tensor([s.flipped for s in samples], dtype=torch.bool),
    )


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by a permutation that depends only on ``(seed, epoch)``.

    Sharded over ``world`` ranks (DDP): the permutation is cut into global batches of ``block``
    indices and rank ``r`` takes the r-th of the ``world`` equal slices of each, so the ranks
    together see exactly the global batches of one process; an incomplete last block is dropped.
    """

    def __init__(self, num_items: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, block: int | None = None) -> None:
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.world = int(rank), int(world)
        self.block = int(block or world)
        if self.block % self.world:
            raise ValueError(f"EpochSampler: block {self.block} is not divisible by world {self.world}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world == 1:
            return iter(order)
        share = self.block // self.world
        mine = []
        for start in range(0, len(order) - self.block + 1, self.block):
            mine += order[start + self.rank * share : start + (self.rank + 1) * share]
        return iter(mine)

    def __len__(self) -> int:
        if self.world == 1:
            return self.num_items
        return (self.num_items // self.block) * (self.block // self.world)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    size_divisor: int = 32,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A :class:`DataLoader` over ``dataset`` yielding :class:`Batch` objects.

    Shuffling comes from an :class:`EpochSampler`; call :func:`set_epoch` every epoch. A dataset
    with a ``pad_to`` attribute (height, width) is collated on that fixed canvas instead of the
    batch's own padded size: a teacher cache holds rows computed on one canvas (``teachers.cache``).

    ``batch_size`` is the global batch; with ``world`` > 1 ranks each loads ``batch_size / world``
    of it (see :class:`EpochSampler`).
    """
    local = batch_size // world
    return DataLoader(
        dataset,
        batch_size=local,
        sampler=EpochSampler(len(dataset), shuffle, seed, rank=rank, world=world, block=batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=functools.partial(collate, size_divisor=size_divisor, pad_to=getattr(dataset, "pad_to", None)),
        drop_last=drop_last,
        persistent_workers=False,  # workers must be rebuilt to see the dataset's new epoch
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set ``epoch`` on the loader's sampler (shuffle order) and dataset (flip draws)."""
    for part in (loader.sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset spec ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{path}: invalid YAML{where}: {problem}") from exc
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a dataset spec maps split names ({', '.join(SPLITS)}) to "
                        f"{{ann_file, image_root}}")
    for key in spec:
        if key not in SPEC_KEYS:
            raise DataError(f"{path}: unknown key '{key}' (allowed: {', '.join(SPEC_KEYS)})")
    return spec


def resolve_split(path: str | Path, split: str) -> tuple[Path, Path]:
    """``(ann_file, image_root)`` of ``split`` for a dataset folder or YAML spec."""
    path = Path(path)
    if path.is_dir():
        ann_file = path / f"{split}.json"
        if not ann_file.is_file():
            raise DataError(f"{path}: no {split}.json (a dataset folder holds train.json, val.json "
                            f"and images/)")
        return ann_file, path / "images"
    if not path.is_file():
        raise DataError(f"{path}: dataset not found (expected a folder or a YAML spec)")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise DataError(f"{path}: a dataset is a folder or a .yaml spec")
    spec = _read_spec(path)
    if not isinstance(spec.get("root", "."), str):
        raise DataError(f"{path}: key 'root' must be a path")
    base = path.parent / spec.get("root", ".")
    if split not in spec:
        present = [k for k in spec if k in SPLITS]
        raise DataError(f"{path}: no split '{split}' (has: {', '.join(present) or 'none'})")
    entry = spec[split]
    if not isinstance(entry, dict):
        raise DataError(f"{path}: split '{split}' must map ann_file and image_root")
    for key in entry:
        if key not in SPLIT_KEYS:
            raise DataError(f"{path}: unknown key '{split}.{key}' (allowed: {', '.join(SPLIT_KEYS)})")
    for key in SPLIT_KEYS:
        if not isinstance(entry.get(key), str):
            raise DataError(f"{path}: missing key '{split}.{key}' (a path)")
    return base / entry["ann_file"], base / entry["image_root"]


def load_dataset(
    path: str | Path, split: str, transform: DetectionTransform, **kwargs: Any
) -> CocoDetection:
    """Load ``split`` of a dataset folder or YAML spec; ``kwargs`` go to :class:`CocoDetection`
    (``invalid_boxes``, ``seed``)."""
    ann_file, image_root = resolve_split(path, split)
    return CocoDetection(ann_file, image_root, transform, **kwargs)
