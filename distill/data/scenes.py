"""The built-in dataset: synthetic scenes of real objects on real textures, written as COCO.

Objects are Fashion-MNIST product images (MIT, Zalando SE; a subset ships in ``assets/``),
colour-tinted and pasted at varied scales onto tinted crops of scikit-image's grass / gravel /
brick texture photographs (CC0). The paste mask of an object is its pixels brighter than a small
threshold (Fashion-MNIST items sit on black), so every box is exact and tight. Overlap is
bounded: any two boxes have IoU <= ``max_iou`` and every object keeps at least ``min_visible``
of its pixels in view. Train and val draw objects from disjoint pools (Fashion-MNIST's train and
test files). See ``assets/NOTICE.txt`` for licenses and the exact images used.

Determinism: scene ``i`` of a split is a pure function of ``(seed, split, i)`` and the shipped
assets; PNG and JSON are written with fixed settings and no timestamps, so the same seed gives
the same bytes (for a given Pillow / zlib).
"""
from __future__ import annotations

import colorsys
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from distill.data.transforms import derive_seed
from distill.errors import ConfigError, DataError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_CODES = {"train": 0, "val": 1}
GENERATOR_VERSION = 1  # bump when the same seed would produce different scenes
PLACEMENT_TRIES = 25


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Scales are object sizes relative to the scene side."""

    size: int = 160
    min_objects: int = 1
    max_objects: int = 4
    negative_fraction: float = 0.05
    min_scale: float = 0.1
    max_scale: float = 0.4
    max_iou: float = 0.4
    min_visible: float = 0.6
    mask_threshold: int = 20  # on the 0..255 intensity of the resized object image

    def validate(self) -> None:
        checks = [
            (self.size >= 32, "size must be >= 32"),
            (0 <= self.min_objects <= self.max_objects <= 50,
             "need 0 <= min_objects <= max_objects <= 50"),
            (0.0 <= self.negative_fraction <= 1.0, "negative_fraction must be in [0, 1]"),
            (0.0 < self.min_scale <= self.max_scale <= 1.0, "need 0 < min_scale <= max_scale <= 1"),
            (round(self.min_scale * self.size) >= 4,
             "objects would be under 4 px (raise min_scale or size)"),
            (0.0 <= self.max_iou <= 1.0, "max_iou must be in [0, 1]"),
            (0.0 <= self.min_visible <= 1.0, "min_visible must be in [0, 1]"),
            (0 <= self.mask_threshold < 255, "mask_threshold must be in [0, 255)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"scene generator: {message} (got {self})")


@dataclass
class Scene:
    """One generated scene.

    image:  (S, S, 3) uint8 RGB.
    boxes:  (K, 4) int64 xyxy, tight around each object's paste mask.
    labels: (K,) int64 class indices into ``CLASSES``.
    masks:  (K, S, S) bool paste mask of each object (before later objects covered parts of it).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class ObjectPool:
    images: np.ndarray  # (N, 28, 28) uint8, white-ish items on black
    labels: np.ndarray  # (N,) int64


def _asset(name: str) -> Traversable:
    return resources.files("distill.data.assets").joinpath(name)


@functools.lru_cache(maxsize=None)
def load_pool(split: str) -> ObjectPool:
    """The shipped Fashion-MNIST images for ``split`` ("train" or "val")."""
    with _asset("fashion_mnist_subset.npz").open("rb") as f, np.load(f) as data:
        return ObjectPool(images=data[f"{split}_images"], labels=data[f"{split}_labels"])


@functools.lru_cache(maxsize=None)
def load_textures() -> tuple[np.ndarray, ...]:
    """The shipped texture photographs, (512, 512) uint8 gray each, in a fixed order."""
    with _asset("textures.npz").open("rb") as f, np.load(f) as data:
        return tuple(data[name] for name in sorted(data.files))


def _tint(
    rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]
) -> np.ndarray:
    """(3,) RGB colour in [0, 1] with a uniform hue."""
    hsv = (rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32)


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    """(h, w) uint8 -> (size, size) float32 via Pillow's bilinear filter."""
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _background(rng: np.random.Generator, textures: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    """(S, S, 3) float32: a random crop of a texture, rotated, resized and tinted dark."""
    texture = textures[rng.integers(len(textures))]
    side = texture.shape[0]
    crop = int(rng.integers(min(size, side), min(2 * size, side) + 1))
    y0, x0 = rng.integers(0, side - crop + 1, size=2)
    patch = np.rot90(texture[y0:y0 + crop, x0:x0 + crop], k=int(rng.integers(4)))
    gray = _resize(np.ascontiguousarray(patch), size)
    # Muted, darkish backgrounds keep the brighter, saturated objects visible.
    return gray[..., None] * _tint(rng, (0.0, 0.35), (0.45, 0.8))


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) xyxy box with (K, 4) boxes -> (K,)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _draw_object(
    rng: np.random.Generator, pool: ObjectPool, cfg: SceneConfig
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A tinted, resized object: (s, s, 3) float32 colours, (s, s) bool mask, label; or None."""
    k = int(rng.integers(len(pool.labels)))
    item = pool.images[k][:, ::-1] if rng.random() < 0.5 else pool.images[k]
    log_scale = rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale))
    side = max(4, round(cfg.size * math.exp(log_scale)))
    gray = _resize(np.ascontiguousarray(item), side)
    mask = gray > cfg.mask_threshold
    if not mask.any():
        return None
    # Keep the item's own shading (0.3..1 of the tint) so texture and folds stay visible.
    colours = 255.0 * _tint(rng, (0.5, 1.0), (0.8, 1.0)) * (0.3 + 0.7 * gray[..., None] / 255.0)
    return colours, mask, int(pool.labels[k])


def _fits(mask: np.ndarray, box: np.ndarray, boxes: list[np.ndarray], owner: np.ndarray,
          areas: list[int], cfg: SceneConfig) -> bool:
    """Overlap rules for a candidate full-scene ``mask`` with tight ``box``."""
    if boxes and _box_iou(box, np.stack(boxes)).max() > cfg.max_iou:
        return False
    covered = owner[mask]  # which earlier objects the new one would hide
    for j, area in enumerate(areas):
        still_visible = np.count_nonzero(owner == j) - np.count_nonzero(covered == j)
        if still_visible < cfg.min_visible * area:
            return False
    return True


def make_scene(rng: np.random.Generator, pool: ObjectPool, textures: tuple[np.ndarray, ...],
               cfg: SceneConfig) -> Scene:
    """Draw one scene; an object that finds no admissible place is left out."""
    size = cfg.size
    image = _background(rng, textures, size)
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object shown at each pixel
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    areas: list[int] = []
    negative = rng.random() < cfg.negative_fraction
    count = 0 if negative else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(count):
        drawn = _draw_object(rng, pool, cfg)
        if drawn is None:
            continue
        colours, tile_mask, label = drawn
        side = tile_mask.shape[0]
        rows, cols = np.flatnonzero(tile_mask.any(1)), np.flatnonzero(tile_mask.any(0))
        for _ in range(PLACEMENT_TRIES):
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1])
            mask = np.zeros((size, size), dtype=bool)
            mask[y0:y0 + side, x0:x0 + side] = tile_mask
            if _fits(mask, box, boxes, owner, areas, cfg):
                image[y0:y0 + side, x0:x0 + side][tile_mask] = colours[tile_mask]
                owner[mask] = len(boxes)
                boxes.append(box)
                labels.append(label)
                masks.append(mask)
                areas.append(int(tile_mask.sum()))
                break
    return Scene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        boxes=np.array(boxes, dtype=np.int64).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        masks=np.array(masks, dtype=bool).reshape(-1, size, size),
    )


def _info(split: str, seed: int, cfg: SceneConfig) -> dict:
    return {
        "description": ("detkd synthetic scenes: real Fashion-MNIST product photographs (objects) "
                        "pasted onto crops of real texture photographs (scikit-image grass, gravel, "
                        "brick). The scenes are synthetic; objects and backgrounds are real images."),
        "generator": "distill.data.scenes.generate_scenes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "params": asdict(cfg),
        "object_pool": ("Fashion-MNIST training file, first 120 images per class" if split == "train"
                        else "Fashion-MNIST test file, first 30 images per class"),
        "licenses": ("objects: MIT (c) 2017 Zalando SE; textures: CC0; "
                     "see distill/data/assets/NOTICE.txt"),
    }


def _write_split(root: Path, split: str, count: int, first_id: int, seed: int, cfg: SceneConfig) -> dict:
    """Render ``count`` scenes into ``root/images`` and write ``root/<split>.json``."""
    pool, textures = load_pool(split), load_textures()
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng(derive_seed(seed, SPLIT_CODES[split], i))
        scene = make_scene(rng, pool, textures, cfg)
        image_id, file_name = first_id + i, f"{split}_{i:06d}.png"
        # Level 1: 4x faster than the default on textured scenes, files about as small.
        Image.fromarray(scene.image).save(root / "images" / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": cfg.size, "height": cfg.size,
                       "license": 1})
        for box, label, mask in zip(scene.boxes.tolist(), scene.labels.tolist(), scene.masks):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": int(mask.sum()), "iscrowd": 0})
    data = {
        "info": _info(split, seed, cfg),
        "licenses": [{"id": 1, "name": "objects MIT (Zalando SE), textures CC0; see NOTICE.txt",
                      "url": ""}],
        "categories": [{"id": k + 1, "name": name, "supercategory": "fashion"}
                       for k, name in enumerate(CLASSES)],
        "images": images,
        "annotations": annotations,
    }
    (root / f"{split}.json").write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    return {"images": count, "objects": len(annotations),
            "negatives": count - len({a["image_id"] for a in annotations})}


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: folder exists and is not empty (pass overwrite=True to replace it)")


def generate_scenes(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    size: int = 160,
    seed: int = 0,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    negative_fraction: float = 0.05,
    min_scale: float = 0.1,
    max_scale: float = 0.4,
    max_iou: float = 0.4,
    min_visible: float = 0.6,
    overwrite: bool = False,
) -> dict:
    """Write a COCO dataset folder: ``train.json``, ``val.json`` and ``images/*.png``.

    Image ids run ``1..num_train`` for train and continue for val. Objects are 1..4 per image
    (``min_objects``..``max_objects``, fewer when no admissible place is found), their longer
    tile side log-uniform in ``[min_scale, max_scale] * size``; ``negative_fraction`` of images
    have none. The folder is built under a temporary name and renamed into place, so a crash
    never leaves half a dataset; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``.

    Returns:
        A summary: ``out_dir``, ``seed``, ``size``, ``classes`` and per split the numbers of
        images, objects and negatives.
    """
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"scene generator: image counts must be >= 0 (got {num_train}, {num_val})")
    cfg = SceneConfig(size=size, min_objects=min_objects, max_objects=max_objects,
                      negative_fraction=negative_fraction, min_scale=min_scale, max_scale=max_scale,
                      max_iou=max_iou, min_visible=min_visible)
    cfg.validate()
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        (tmp / "images").mkdir()
        summary: dict = {"out_dir": str(out), "seed": seed, "size": size, "classes": list(CLASSES)}
        summary["train"] = _write_split(tmp, "train", num_train, 1, seed, cfg)
        summary["val"] = _write_split(tmp, "val", num_val, num_train + 1, seed, cfg)
        _check_out_dir(out, overwrite)  # it may have appeared meanwhile
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
