"""COCO-format detection dataset, validated up front.

Everything a user can get wrong in an annotation file is checked when the dataset is built and
reported as one :class:`~distill.errors.DataError` line naming the file, image id and annotation
id; an image that cannot be decoded is reported the same way when it is loaded.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.transforms import DetectionTransform
from distill.errors import ConfigError, DataError
from distill.structures import Target

InvalidBoxPolicy = Literal["error", "clip"]

# Boxes may poke out of the image by float noise (annotation tools round); this much is not an
# error and is clamped silently.
BOX_TOLERANCE = 1.0


@dataclass
class Sample:
    """One transformed dataset item.

    image:    (3, H, W) float32, normalized.
    target:   boxes (G, 4) xyxy in input pixels, labels (G,) contiguous class indices.
    image_id: COCO image id.
    scale:    input pixels = original pixels * scale.
    flipped:  the image (and its boxes) were mirrored horizontally after resizing.
    """

    image: Tensor
    target: Target
    image_id: int
    scale: float
    flipped: bool


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a DataError with the error position."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
                        f"(char {exc.pos})") from exc
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise DataError(f"{path}: invalid JSON: {reason}") from exc


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``entry[key]`` checked to be of ``kind`` (bool never counts as a number)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{where}: missing key '{key}'")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def check_structure(data: Any, path: Path) -> None:
    """Check the COCO skeleton: lists of images / annotations / categories with unique ids."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing list '{key}'")
    image_ids: set[int] = set()
    for k, img in enumerate(data["images"]):
        image_id = _field(img, "id", int, f"{path}: images[{k}]")
        where = f"{path}: image id {image_id}"
        _field(img, "file_name", str, where)
        for key in ("width", "height"):
            if _field(img, key, int, where) <= 0:
                raise DataError(f"{where}: '{key}' must be positive, got {img[key]}")
        if image_id in image_ids:
            raise DataError(f"{where}: duplicate image id")
        image_ids.add(image_id)
    cat_ids: set[int] = set()
    for k, cat in enumerate(data["categories"]):
        cat_id = _field(cat, "id", int, f"{path}: categories[{k}]")
        _field(cat, "name", str, f"{path}: category id {cat_id}")
        if cat_id in cat_ids:
            raise DataError(f"{path}: category id {cat_id}: duplicate category id")
        cat_ids.add(cat_id)
    if not cat_ids:
        raise DataError(f"{path}: 'categories' is empty")
    ann_ids: set[int] = set()
    for k, ann in enumerate(data["annotations"]):
        ann_id = _field(ann, "id", int, f"{path}: annotations[{k}]")
        image_id = _field(ann, "image_id", int, f"{path}: annotation id {ann_id}")
        where = f"{path}: image id {image_id}, annotation id {ann_id}"
        if ann_id in ann_ids:
            raise DataError(f"{where}: duplicate annotation id")
        ann_ids.add(ann_id)
        if image_id not in image_ids:
            raise DataError(f"{where}: no image with this id")
        cat_id = _field(ann, "category_id", int, where)
        if not ann.get("iscrowd", 0) and cat_id not in cat_ids:
            raise DataError(f"{where}: unknown category id {cat_id} (known: {sorted(cat_ids)})")
        bbox = _field(ann, "bbox", list, where)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        if len(bbox) != 4 or not numbers:
            raise DataError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox}")
        if any(isinstance(v, int) and abs(v) > 2**53 for v in bbox):  # float() of such ints overflows or rounds
            raise DataError(f"{where}: bbox {bbox} has a coordinate too large for a float")


def _box_problem(bbox: list[float], width: int, height: int) -> tuple[str, bool] | None:
    """Why a COCO ``[x, y, w, h]`` box is invalid, and whether clipping can repair it."""
    x, y, w, h = bbox
    if not all(math.isfinite(v) for v in bbox):
        return "has non-finite values", False
    if w <= 0 or h <= 0:
        return "has non-positive size", False
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        inside_w = min(x + w, width) - max(x, 0)
        inside_h = min(y + h, height) - max(y, 0)
        if inside_w > 0 and inside_h > 0:
            return f"extends outside the {width}x{height} image", True
        return f"lies entirely outside the {width}x{height} image", False
    return None


def build_targets(
    coco: COCO, path: Path, cat_index: dict[int, int], policy: InvalidBoxPolicy
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per image id: boxes (G, 4) float32 xyxy original pixels and labels (G,) int64.

    Crowd annotations are never targets. Invalid boxes raise (``"error"``) or are clipped to the
    image / dropped when degenerate (``"clip"``, summarised in one warning).
    """
    targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    repaired: dict[bool, list[str]] = {True: [], False: []}  # clipped / dropped examples
    for image_id, img in coco.imgs.items():
        width, height = img["width"], img["height"]
        boxes, labels = [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            bbox = [float(v) for v in ann["bbox"]]
            problem = _box_problem(bbox, width, height)
            if problem is not None:
                reason, repairable = problem
                example = f"image id {image_id}, annotation id {ann['id']}: bbox {ann['bbox']} {reason}"
                if policy == "error":
                    raise DataError(f"{path}: {example} "
                                    "(invalid_boxes='clip' clips or drops such boxes)")
                repaired[repairable].append(example)
                if not repairable:
                    continue
            x, y, w, h = bbox
            boxes.append([max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)])
            labels.append(cat_index[ann["category_id"]])
        targets[image_id] = (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                             np.asarray(labels, dtype=np.int64))
    clipped, dropped = repaired[True], repaired[False]
    if clipped or dropped:
        first = lambda examples: f" (first: {examples[0]})" if examples else ""  # noqa: E731
        warnings.warn(f"{path}: clipped {len(clipped)} boxes partly outside their image"
                      f"{first(clipped)}; dropped {len(dropped)} degenerate boxes{first(dropped)}",
                      stacklevel=3)
    return targets


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Args:
        ann_file: COCO instances JSON.
        image_root: folder the images' ``file_name`` entries are relative to.
        transform: resize / flip / normalize applied to every item.
        invalid_boxes: ``"error"`` raises on a box with non-positive size or outside its image;
            ``"clip"`` clips partly-outside boxes and drops degenerate ones, with one warning.
        seed: flip draws depend on ``(seed, epoch, index)`` only, so a resumed run repeats them.

    Attributes:
        classes: contiguous index -> category name (categories sorted by id).
        cat_ids: contiguous index -> COCO category id (to write results back).
        image_ids: dataset index -> COCO image id (sorted).
        coco: the ``pycocotools`` ground truth, for evaluation.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transform: DetectionTransform,
        invalid_boxes: InvalidBoxPolicy = "error",
        seed: int = 0,
    ) -> None:
        if invalid_boxes not in ("error", "clip"):
            raise ConfigError(f"invalid_boxes must be 'error' or 'clip', got {invalid_boxes!r}")
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.transform = transform
        self.invalid_boxes = invalid_boxes
        self.seed = int(seed)
        self.epoch = 0

        data = read_json(self.ann_file)
        check_structure(data, self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.classes: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.image_ids: list[int] = sorted(self.coco.imgs)
        cat_index = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        self._targets = build_targets(self.coco, self.ann_file, cat_index, invalid_boxes)
        self._check_image_files()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _image_path(self, image_id: int) -> Path:
        return self.image_root / self.coco.imgs[image_id]["file_name"]

    def _check_image_files(self) -> None:
        if not self.image_root.is_dir():
            raise DataError(f"{self.ann_file}: image folder {self.image_root} does not exist")
        missing = [i for i in self.image_ids if not self._image_path(i).is_file()]
        if missing:
            raise DataError(f"{self.ann_file}: image file {self._image_path(missing[0])} (image id "
                            f"{missing[0]}) not found; {len(missing)} of {len(self.image_ids)} "
                            f"images are missing under {self.image_root}")

    def _read_image(self, image_id: int) -> Tensor:
        """(3, H, W) uint8 RGB, checked against the size the annotation file declares."""
        path = self._image_path(image_id)
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # decodes the whole file: truncation shows up here
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read image (image id {image_id}): {exc}") from exc
        info = self.coco.imgs[image_id]
        if rgb.size != (info["width"], info["height"]):
            raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but {self.ann_file} says "
                            f"{info['width']}x{info['height']} (image id {image_id})")
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flip draws ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def flip_for(self, index: int, epoch: int | None = None) -> bool:
        """The flip decision of ``index`` in ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return self.transform.should_flip(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        return self.get(index, self.flip_for(index))

    def get(self, index: int, flip: bool) -> Sample:
        """Item ``index`` with an explicit flip decision (deterministic)."""
        image_id = self.image_ids[index]
        image = self._read_image(image_id)
        boxes, labels = self._targets[image_id]
        pixels, boxes_in, scale = self.transform(image, torch.from_numpy(boxes), flip)
        target = Target(boxes=boxes_in, labels=torch.from_numpy(labels.copy()))
        return Sample(image=pixels, target=target, image_id=image_id, scale=scale, flipped=flip)

    def original_target(self, index: int) -> Target:
        """Ground truth of ``index`` in original image pixels (no transform)."""
        boxes, labels = self._targets[self.image_ids[index]]
        return Target(boxes=torch.from_numpy(boxes.copy()), labels=torch.from_numpy(labels.copy()))

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file}, images={len(self)}, classes={self.num_classes}, "
                f"transform={self.transform!r})")
