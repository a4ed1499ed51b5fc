"""The second built-in dataset: cluttered photographs with many small, partly hidden objects, as COCO.

Objects are real images of 20 classes: 10 animal silhouettes from Animal-MNIST (MIT) and the 10
handwritten digits of OpenCV's ``digits.png`` (Apache-2.0, from MNIST); a subset ships in
``assets/clutter_objects.npz``. Each is colour-tinted, lit by a soft gradient, given a 1-px dark
outline (so it reads on a busy photograph), stretched by a random aspect ratio and pasted onto a
random crop of one of six CC0 / public-domain colour photographs from scikit-image
(``assets/photos.npz``). Many objects per image (``min_objects``..``max_objects``), the longer
side of each tile log-uniform over a wide range, ``max(min_scale * S, 8 px)``..``max_scale * S``
for an image of side S (8 to 72 px at 160 px by default), so most of them are small.

Occlusion rule. Objects are pasted in order and later ones hide earlier ones:

* every box is tight around the object's **visible** pixels, and its COCO ``area`` counts them;
* occlusion is bounded: every object keeps at least ``min_visible`` of its pasted pixels in view,
  and any two visible boxes have IoU <= ``max_iou``. A placement that would push an earlier object
  under ``min_visible`` (or a box over ``max_iou``) is refused and another position tried; after
  25 refusals the new object is left out. So a heavily occluded object never exists in the data:
  there is no unlabelled half-hidden object and no box around a few stray pixels.

Train and val draw objects from disjoint pools; both use the same photographs (different crops).
See ``assets/NOTICE.txt`` for licenses and the exact images used.

Determinism: image ``i`` of a split is a pure function of ``(seed, split, i)`` and the shipped
assets; PNG and JSON are written with fixed settings, so the same seed gives the same bytes.
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

ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
CLASSES: tuple[str, ...] = ANIMALS + tuple(f"digit {d}" for d in range(10))
GENERATOR_VERSION = 1  # bump when the same seed would produce different images
GENERATOR_CODE = 2  # mixed into the per-image seed: clutter and scenes draw from unrelated streams
MIN_SIDE = 8  # px, longest tile side at least: a smaller tile leaves an object of a few pixels
MIN_TILE = 6  # px, either tile side at least


@dataclass(frozen=True)
class ClutterConfig:
    """How clutter images are drawn. Scales are tile sides relative to the image side."""

    size: int = 160
    min_objects: int = 8
    max_objects: int = 24
    negative_fraction: float = 0.02
    min_scale: float = 0.05  # floored at MIN_SIDE px
    max_scale: float = 0.45
    max_aspect: float = 1.3  # tile width / height in [1 / max_aspect, max_aspect]
    max_iou: float = 0.5
    min_visible: float = 0.4
    mask_threshold: int = 60  # on the 0..255 intensity of the resized object image

    def validate(self) -> None:
        checks = [
            (self.size >= 32, "size must be >= 32"),
            (0 <= self.min_objects <= self.max_objects <= 100,
             "need 0 <= min_objects <= max_objects <= 100"),
            (0.0 <= self.negative_fraction <= 1.0, "negative_fraction must be in [0, 1]"),
            (0.0 < self.min_scale <= self.max_scale <= 0.9, "need 0 < min_scale <= max_scale <= 0.9"),
            (self.max_scale * self.size >= MIN_SIDE,
             f"objects would be under {MIN_SIDE} px (raise max_scale or size)"),
            (1.0 <= self.max_aspect <= 2.0, "max_aspect must be in [1, 2]"),
            (0.0 <= self.max_iou <= 1.0, "max_iou must be in [0, 1]"),
            (0.0 <= self.min_visible <= 1.0, "min_visible must be in [0, 1]"),
            (0 <= self.mask_threshold < 255, "mask_threshold must be in [0, 255)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"clutter generator: {message} (got {self})")


@dataclass
class ClutterScene(Scene):
    """A :class:`Scene` whose ``masks`` are the visible pixels; ``pasted`` (K, S, S) bool holds
    each object's full paste mask, before later objects hid parts of it."""

    pasted: np.ndarray


@dataclass(frozen=True)
class ClutterPool:
    tiles: tuple[np.ndarray, ...]  # per class, (N_c, h, w) uint8, bright object on black
    mirror: tuple[bool, ...]  # per class: may it be flipped left-right (animals yes, digits no)


@functools.lru_cache(maxsize=None)
def load_pool(split: str) -> ClutterPool:
    """The shipped object images of ``split`` ("train" or "val"), grouped by class."""
    with asset("clutter_objects.npz").open("rb") as f, np.load(f) as data:
        tiles: list[np.ndarray] = []
        for source in ("animals", "digits"):
            images, labels = data[f"{source}_{split}_images"], data[f"{source}_{split}_labels"]
            tiles += [images[labels == c] for c in range(10)]
    return ClutterPool(tiles=tuple(tiles), mirror=(True,) * 10 + (False,) * 10)


@functools.lru_cache(maxsize=None)
def load_photos() -> tuple[np.ndarray, ...]:
    """The shipped background photographs, (H, W, 3) uint8 each, in a fixed order."""
    with asset("photos.npz").open("rb") as f, np.load(f) as data:
        return tuple(data[name] for name in sorted(data.files))


def _background(rng: np.random.Generator, photos: tuple[np.ndarray, ...], size: int) -> np.ndarray:
    """(S, S, 3) float32: a random square crop of a photo (40-100% of its shorter side), maybe
    mirrored, resized to S and slightly dimmed so the tinted objects stand out."""
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    short = min(height, width)
    crop = int(rng.integers(max(1, round(0.4 * short)), short + 1))
    y0, x0 = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    patch = photo[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return resize(np.ascontiguousarray(patch), size, size) * np.float32(rng.uniform(0.6, 0.9))


def _outlined(core: np.ndarray) -> np.ndarray:
    """(h, w) bool -> (h + 2, w + 2) bool: ``core`` padded by one pixel, grown by one pixel
    (8-neighbourhood), so the outline is never cut off at the tile edge."""
    padded = np.pad(core, 2)
    grown = np.zeros_like(padded)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(padded, (dy, dx), axis=(0, 1))
    return grown[1:-1, 1:-1]


def draw_object(rng: np.random.Generator, pool: ClutterPool,
                cfg: ClutterConfig) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A tinted object tile: (h, w, 3) float32 colours, (h, w) bool mask, label; None if empty."""
    label = int(rng.integers(len(pool.tiles)))
    images = pool.tiles[label]
    item = images[rng.integers(len(images))]
    if pool.mirror[label] and rng.random() < 0.5:
        item = item[:, ::-1]
    low, high = max(cfg.min_scale * cfg.size, MIN_SIDE), cfg.max_scale * cfg.size
    side = math.exp(rng.uniform(math.log(low), math.log(high)))
    aspect = math.exp(rng.uniform(-math.log(cfg.max_aspect), math.log(cfg.max_aspect)))
    width, height = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    width, height = max(MIN_TILE, round(width)), max(MIN_TILE, round(height))
    gray = resize(np.ascontiguousarray(item), width, height)
    core = gray > cfg.mask_threshold
    if not core.any():
        return None
    mask = _outlined(core)
    shade = np.pad(gray, 1)[..., None] / 255.0
    # A soft light gradient across the tile: the silhouettes are flat white.
    ys, xs = np.mgrid[0:height + 2, 0:width + 2]
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(angle) * xs / (width + 1) + math.sin(angle) * ys / (height + 1))[..., None]
    colour = 255.0 * tint(rng, (0.55, 1.0), (0.75, 1.0))
    body = colour * (0.55 + 0.25 * shade + 0.2 * (ramp - ramp.min()))
    outline = colour * 0.15  # dark rim of the same hue
    colours = np.where(np.pad(core, 1)[..., None], body, outline).astype(np.float32)
    return colours, mask, label


def _admissible(canvas: Canvas, tile_mask: np.ndarray, y0: int, x0: int, cfg: ClutterConfig) -> bool:
    """The occlusion rule for ``tile_mask`` pasted at (y0, x0): every earlier object keeps
    ``min_visible`` of its pixels, and the new box has IoU <= ``max_iou`` with every visible box
    (earlier boxes shrink to what the new object leaves of them)."""
    hidden = canvas.hidden_by(tile_mask, y0, x0)
    if not canvas.keeps_visible(hidden, cfg.min_visible) or (np.array(canvas.visible) - hidden < 1).any():
        return False  # (the second test matters only with min_visible 0: no object vanishes)
    if not canvas.pasted:
        return True
    box = tight_box(tile_mask, y0, x0)
    visible = [canvas.visible_box(k, (tile_mask, y0, x0)) if hidden[k] else canvas.visible_box(k)
               for k in range(len(canvas.pasted))]
    return box_iou(box, np.stack(visible)).max() <= cfg.max_iou


def make_clutter(rng: np.random.Generator, pool: ClutterPool, photos: tuple[np.ndarray, ...],
                 cfg: ClutterConfig) -> ClutterScene:
    """Draw one image; an object that finds no admissible place is left out."""
    size = cfg.size
    canvas = Canvas(_background(rng, photos, size))
    labels: list[int] = []
    placements: list[tuple[np.ndarray, int, int]] = []
    negative = rng.random() < cfg.negative_fraction
    count = 0 if negative else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(count):
        drawn = draw_object(rng, pool, cfg)
        if drawn is None:
            continue
        colours, tile_mask, label = drawn
        height, width = tile_mask.shape
        if height > size or width > size:
            continue
        for _ in range(PLACEMENT_TRIES):
            y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
            if _admissible(canvas, tile_mask, y0, x0, cfg):
                canvas.paste(colours, tile_mask, y0, x0)
                labels.append(label)
                placements.append((tile_mask, y0, x0))
                break
    count = len(labels)
    return ClutterScene(
        image=canvas.rendered(),
        boxes=np.array([canvas.visible_box(k) for k in range(count)], dtype=np.int64).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        masks=np.array([canvas.owner == k for k in range(count)], dtype=bool).reshape(-1, size, size),
        pasted=np.array([canvas.placed(*p) for p in placements], dtype=bool).reshape(-1, size, size),
    )


def _occlusion_counts(scene: ClutterScene) -> dict[str, int]:
    """Objects with at least one pixel hidden by a later object."""
    return {"occluded": int((scene.masks.sum((1, 2)) < scene.pasted.sum((1, 2))).sum())}


def _header(split: str, seed: int, cfg: ClutterConfig) -> dict:
    info = {
        "description": ("detkd clutter: real Animal-MNIST silhouettes and OpenCV handwritten digits "
                        "(20 classes), tinted and pasted, many per image and partly occluding each "
                        "other, onto crops of real CC0 / public-domain photographs (scikit-image). "
                        "The images are synthetic; objects and backgrounds are real images. Boxes "
                        "are tight around the visible pixels; every object keeps at least "
                        "min_visible of its pixels in view."),
        "generator": "distill.data.clutter.generate_clutter",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "params": asdict(cfg),
        "object_pool": ("first 160 distinct images per class" if split == "train"
                        else "next 40 distinct images per class"),
        "licenses": ("animals: MIT (c) 2025 SinaSR-6; digits: OpenCV, Apache-2.0; photographs: CC0 "
                     "or public domain; see distill/data/assets/NOTICE.txt"),
    }
    return {
        "info": info,
        "licenses": [{"id": 1, "name": "objects MIT (Animal-MNIST) and Apache-2.0 (OpenCV digits), "
                      "photographs CC0 / public domain; see NOTICE.txt", "url": ""}],
        "categories": [{"id": k + 1, "name": name, "supercategory": "animal" if k < 10 else "digit"}
                       for k, name in enumerate(CLASSES)],
    }


def generate_clutter(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    size: int = 160,
    seed: int = 0,
    *,
    min_objects: int = 8,
    max_objects: int = 24,
    negative_fraction: float = 0.02,
    min_scale: float = 0.05,
    max_scale: float = 0.45,
    max_iou: float = 0.5,
    min_visible: float = 0.4,
    overwrite: bool = False,
) -> dict:
    """Write a COCO dataset folder of clutter images: ``train.json``, ``val.json``, ``images/*.png``.

    Image ids run ``1..num_train`` for train and continue for val. ``min_objects``..``max_objects``
    objects are tried per image (fewer land when no admissible place is found); ``negative_fraction``
    of images have none. Written like :func:`~distill.data.scenes.generate_scenes`: under a
    temporary name, then renamed; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``.

    Returns:
        A summary: ``out_dir``, ``seed``, ``size``, ``classes`` and per split the numbers of
        images, objects, negatives and occluded objects.
    """
    cfg = ClutterConfig(size=size, min_objects=min_objects, max_objects=max_objects,
                        negative_fraction=negative_fraction, min_scale=min_scale, max_scale=max_scale,
                        max_iou=max_iou, min_visible=min_visible)
    cfg.validate()

    def split_writer(tmp: Path, split: str, count: int, first_id: int) -> dict:
        pool, photos = load_pool(split), load_photos()

        def render(i: int) -> Scene:
            rng = np.random.default_rng(derive_seed(seed, GENERATOR_CODE, SPLIT_CODES[split], i))
            return make_clutter(rng, pool, photos, cfg)

        return write_split(tmp, split, count, first_id, render, _header(split, seed, cfg), _occlusion_counts)

    head = {"seed": seed, "size": size, "classes": list(CLASSES)}
    return write_generated("clutter", out_dir, num_train, num_val, overwrite, head, split_writer)
