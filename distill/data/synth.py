"""Shared machinery of the built-in generators (``scenes``, ``clutter``): compositing and writing.

A generator draws each image as a pure function of ``(seed, split, index)``, pastes tinted object
tiles onto a :class:`Canvas` (which remembers which object shows at each pixel, so overlap and
visibility are exact), and hands :class:`Scene` objects to :func:`write_dataset`, which writes a
COCO folder under a temporary name and renames it into place. PNG and JSON are written with fixed
settings and no timestamps, so the same seed gives the same bytes (for a given Pillow / zlib).
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from distill.checkpoint import make_dir
from distill.errors import ConfigError, DataError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SPLIT_CODES = {"train": 0, "val": 1}
PLACEMENT_TRIES = 25  # positions tried per object before it is left out


@dataclass
class Scene:
    """One generated image and its objects.

    image:  (S, S, 3) uint8 RGB.
    boxes:  (K, 4) int64 xyxy, tight around ``masks[k]``.
    labels: (K,) int64 class indices.
    masks:  (K, S, S) bool, the pixels each box is tight around (its COCO ``area``).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def asset(name: str) -> Traversable:
    """A data file shipped in ``distill/data/assets``."""
    return resources.files("distill.data.assets").joinpath(name)


def tint(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """(3,) RGB colour in [0, 1] with a uniform hue."""
    hsv = (rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32)


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w) or (h, w, 3) uint8 -> (height, width[, 3]) float32 via Pillow's bilinear filter."""
    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR), dtype=np.float32)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) xyxy box with (K, 4) boxes -> (K,)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def tight_box(mask: np.ndarray, y0: int = 0, x0: int = 0) -> np.ndarray | None:
    """(4,) int64 xyxy around the True pixels of (h, w) ``mask`` placed at (y0, x0); None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.int64)


class Canvas:
    """An image being composited, and which pasted object shows at each of its pixels.

    image:   (S, S, 3) float32, the background with the objects pasted so far.
    owner:   (S, S) int64, index of the object showing at each pixel, -1 for the background.
    pasted:  per object, the pixels it covered when pasted (its full mask's area).
    visible: per object, how many of those still show (later objects may hide some).
    boxes:   per object, the tight box of its full paste mask.
    """

    def __init__(self, background: np.ndarray) -> None:
        self.image = background
        self.owner = np.full(background.shape[:2], -1, dtype=np.int64)
        self.pasted: list[int] = []
        self.visible: list[int] = []
        self.boxes: list[np.ndarray] = []

    def hidden_by(self, tile_mask: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """(K,) int64: pixels of each object that pasting ``tile_mask`` at (y0, x0) would hide."""
        h, w = tile_mask.shape
        covered = self.owner[y0:y0 + h, x0:x0 + w][tile_mask]
        return np.bincount(covered[covered >= 0], minlength=len(self.pasted))

    def keeps_visible(self, hidden: np.ndarray, min_visible: float) -> bool:
        """Would every object keep at least ``min_visible`` of its pixels after hiding ``hidden``?"""
        return all(v - h >= min_visible * p for v, h, p in zip(self.visible, hidden.tolist(), self.pasted))

    def visible_box(self, k: int, cover: tuple[np.ndarray, int, int] | None = None) -> np.ndarray | None:
        """Tight box of object ``k``'s visible pixels, optionally after pasting ``cover`` =
        (tile_mask, y0, x0) on top; None when nothing of it would show."""
        x1, y1, x2, y2 = (int(v) for v in self.boxes[k])
        shows = self.owner[y1:y2, x1:x2] == k
        if cover is not None:
            tile_mask, ty, tx = cover
            h, w = tile_mask.shape
            # The cover's pixels inside k's paste box, in that box's frame.
            oy1, ox1, oy2, ox2 = max(y1, ty), max(x1, tx), min(y2, ty + h), min(x2, tx + w)
            if oy1 < oy2 and ox1 < ox2:
                shows = shows.copy()
                shows[oy1 - y1:oy2 - y1, ox1 - x1:ox2 - x1] &= ~tile_mask[oy1 - ty:oy2 - ty, ox1 - tx:ox2 - tx]
        return tight_box(shows, y1, x1)

    def paste(self, colours: np.ndarray, tile_mask: np.ndarray, y0: int, x0: int) -> int:
        """Paint ``colours`` (h, w, 3) where ``tile_mask`` (h, w) is True, at (y0, x0); its index."""
        h, w = tile_mask.shape
        hidden = self.hidden_by(tile_mask, y0, x0)
        self.visible = [v - int(c) for v, c in zip(self.visible, hidden.tolist())]
        self.image[y0:y0 + h, x0:x0 + w][tile_mask] = colours[tile_mask]
        k = len(self.pasted)
        self.owner[y0:y0 + h, x0:x0 + w][tile_mask] = k
        count = int(tile_mask.sum())
        self.pasted.append(count)
        self.visible.append(count)
        self.boxes.append(tight_box(tile_mask, y0, x0))
        return k

    def placed(self, tile_mask: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """(S, S) bool: ``tile_mask`` (h, w) placed at (y0, x0) on a canvas-sized mask."""
        mask = np.zeros(self.owner.shape, dtype=bool)
        h, w = tile_mask.shape
        mask[y0:y0 + h, x0:x0 + w] = tile_mask
        return mask

    def rendered(self) -> np.ndarray:
        """(S, S, 3) uint8 of the image as composited."""
        return np.clip(np.rint(self.image), 0, 255).astype(np.uint8)


def write_split(
    root: Path,
    split: str,
    count: int,
    first_id: int,
    render: Callable[[int], Scene],
    header: dict,
    tally: Callable[[Scene], dict[str, int]] | None = None,
) -> dict:
    """Render scenes ``0..count-1`` with ``render`` into ``root/images`` and write ``root/<split>.json``.

    ``header`` holds the JSON's ``info``, ``licenses`` and ``categories``; category ids are label + 1.
    Returns the numbers of images, objects and negatives, plus the sums of ``tally(scene)``.
    """
    images, annotations = [], []
    extra: dict[str, int] = {}
    for i in range(count):
        scene = render(i)
        height, width = scene.image.shape[:2]
        image_id, file_name = first_id + i, f"{split}_{i:06d}.png"
        # Level 1: 4x faster than the default on textured scenes, files about as small.
        Image.fromarray(scene.image).save(root / "images" / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "license": 1})
        for box, label, mask in zip(scene.boxes.tolist(), scene.labels.tolist(), scene.masks):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": int(mask.sum()), "iscrowd": 0})
        for key, value in (tally(scene) if tally else {}).items():
            extra[key] = extra.get(key, 0) + value
    data = {**header, "images": images, "annotations": annotations}
    (root / f"{split}.json").write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    return {"images": count, "objects": len(annotations),
            "negatives": count - len({a["image_id"] for a in annotations}), **extra}


def check_out_dir(out: Path, overwrite: bool) -> None:
    """A new or empty folder; with ``overwrite`` also a dataset folder (never another kind of folder,
    nor a folder inside a dataset, cache or checkpoint folder); writable."""
    from distill.outputs import check_output_folder, is_dataset_folder

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
        if not is_dataset_folder(out):
            raise DataError(f"{out}: folder exists and is not a dataset (no images/ and train.json or val.json); --overwrite replaces only a dataset")
    check_output_folder(out, self_too=False)


def write_generated(
    generator: str, out_dir: str | Path, num_train: int, num_val: int, overwrite: bool, head: dict,
    split_writer: Callable[[Path, str, int, int], dict],
) -> dict:
    """Both splits of a generated dataset, written atomically (:func:`write_dataset`): train images
    get ids ``1..num_train``, val continues after them. ``split_writer(tmp, split, count, first_id)``
    writes one split and returns its counts; the summary is ``out_dir``, then ``head``, then both."""
    if num_train < 0 or num_val < 0:
        raise ConfigError(f"{generator} generator: image counts must be >= 0 (got {num_train}, {num_val})")

    def fill(tmp: Path) -> dict:
        summary: dict = {"out_dir": str(Path(out_dir)), **head}
        summary["train"] = split_writer(tmp, "train", num_train, 1)
        summary["val"] = split_writer(tmp, "val", num_val, num_train + 1)
        return summary

    return write_dataset(out_dir, overwrite, fill)


def write_dataset(out_dir: str | Path, overwrite: bool, fill: Callable[[Path], dict]) -> dict:
    """Build a dataset folder with ``fill(tmp)`` (``tmp/images`` exists) and rename it to ``out_dir``.

    The folder is built under a temporary name beside ``out_dir``, so a crash never leaves half a
    dataset; an existing non-empty ``out_dir`` is replaced only with ``overwrite``. Returns ``fill``'s
    summary.
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    make_dir(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        (tmp / "images").mkdir()
        summary = fill(tmp)
        check_out_dir(out, overwrite)  # it may have appeared meanwhile
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
