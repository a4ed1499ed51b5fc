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

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distill.data.synth import (
    PLACEMENT_TRIES,
    SPLIT_CODES,
    Canvas,
    Scene,
    asset,
    box_iou,
    resize,
    tight_box,
    tint,
    write_generated,
    write_split,
)
from distill.data.transforms import derive_seed
from distill.errors import ConfigError

CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
GENERATOR_VERSION = 1  # bump when the same seed would produce different scenes


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


@dataclass(frozen=True)
class ObjectPool:
    images: np.ndarray  # (N, 28, 28) uint8, white-ish items on black
    labels: np.ndarray  # (N,) int64


@functools.lru_cache(maxsize=None)
def load_pool(split: str) -> ObjectPool:
    """The shipped Fashion-MNIST images for ``split`` ("train" or "val")."""
    with asset("fashion_mnist_subset.npz").open("rb") as f, np.load(f) as data:
        return ObjectPool(images=data[f"{split}_images"], labels=data[f"{split}_labels"])


@functools.lru_cache(maxsize=None)
def load_textures() -> tuple[np.ndarray, ...]:
    """The shipped texture photographs, (512, 512) uint8 gray each, in a fixed order."""
    with asset("textures.npz").open("rb") as f, np.load(f) as data:
        return tuple(data[name] for name in sorted(data.files))


def _background(rng: np.random.Generator, textures: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    """(S, S, 3) float32: a random crop of a texture, rotated, resized and tinted dark."""
    texture = textures[rng.integers(len(textures))]
    side = texture.shape[0]
    crop = int(rng.integers(min(size, side), min(2 * size, side) + 1))
    y0, x0 = rng.integers(0, side - crop + 1, size=2)
    patch = np.rot90(texture[y0:y0 + crop, x0:x0 + crop], k=int(rng.integers(4)))
    gray = resize(np.ascontiguousarray(patch), size, size)
    # Muted, darkish backgrounds keep the brighter, saturated objects visible.
    return gray[..., None] * tint(rng, (0.0, 0.35), (0.45, 0.8))


def _draw_object(
    rng: np.random.Generator, pool: ObjectPool, cfg: SceneConfig
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A tinted, resized object: (s, s, 3) float32 colours, (s, s) bool mask, label; or None."""
    k = int(rng.integers(len(pool.labels)))
    item = pool.images[k][:, ::-1] if rng.random() < 0.5 else pool.images[k]
    log_scale = rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale))
    side = max(4, round(cfg.size * math.exp(log_scale)))
    gray = resize(np.ascontiguousarray(item), side, side)
    mask = gray > cfg.mask_threshold
    if not mask.any():
        return None
    # Keep the item's own shading (0.3..1 of the tint) so texture and folds stay visible.
    colours = 255.0 * tint(rng, (0.5, 1.0), (0.8, 1.0)) * (0.3 + 0.7 * gray[..., None] / 255.0)
    return colours, mask, int(pool.labels[k])


def _fits(canvas: Canvas, tile_mask: np.ndarray, y0: int, x0: int, box: np.ndarray,
          cfg: SceneConfig) -> bool:
    """Overlap rules for ``tile_mask`` pasted at (y0, x0) with tight ``box``: IoU with every earlier
    box at most ``max_iou``, and every earlier object keeps ``min_visible`` of its pixels."""
    if canvas.boxes and box_iou(box, np.stack(canvas.boxes)).max() > cfg.max_iou:
        return False
    return canvas.keeps_visible(canvas.hidden_by(tile_mask, y0, x0), cfg.min_visible)


def make_scene(rng: np.random.Generator, pool: ObjectPool, textures: tuple[np.ndarray, ...],
               cfg: SceneConfig) -> Scene:
    """Draw one scene; an object that finds no admissible place is left out.

    Its ``masks`` are the full paste masks (before later objects covered parts of them).
    """
    size = cfg.size
    canvas = Canvas(_background(rng, textures, size))
    labels: list[int] = []
    masks: list[np.ndarray] = []
    negative = rng.random() < cfg.negative_fraction
    count = 0 if negative else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(count):
        drawn = _draw_object(rng, pool, cfg)
        if drawn is None:
            continue
        colours, tile_mask, label = drawn
        side = tile_mask.shape[0]
        tile_box = tight_box(tile_mask)
        for _ in range(PLACEMENT_TRIES):
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = tile_box + np.array([x0, y0, x0, y0])
            if _fits(canvas, tile_mask, y0, x0, box, cfg):
                canvas.paste(colours, tile_mask, y0, x0)
                labels.append(label)
                masks.append(canvas.placed(tile_mask, y0, x0))
                break
    return Scene(
        image=canvas.rendered(),
        boxes=np.array(canvas.boxes, dtype=np.int64).reshape(-1, 4),
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

    def render(i: int) -> Scene:
        return make_scene(np.random.default_rng(derive_seed(seed, SPLIT_CODES[split], i)), pool, textures, cfg)

    header = {
        "info": _info(split, seed, cfg),
        "licenses": [{"id": 1, "name": "objects MIT (Zalando SE), textures CC0; see NOTICE.txt",
                      "url": ""}],
        "categories": [{"id": k + 1, "name": name, "supercategory": "fashion"}
                       for k, name in enumerate(CLASSES)],
    }
    return write_split(root, split, count, first_id, render, header)


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
    cfg = SceneConfig(size=size, min_objects=min_objects, max_objects=max_objects,
                      negative_fraction=negative_fraction, min_scale=min_scale, max_scale=max_scale,
                      max_iou=max_iou, min_visible=min_visible)
    cfg.validate()

    head = {"seed": seed, "size": size, "classes": list(CLASSES)}
    return write_generated(
        "scene", out_dir, num_train, num_val, overwrite, head, lambda tmp, split, count, first: _write_split(tmp, split, count, first, seed, cfg)
    )
