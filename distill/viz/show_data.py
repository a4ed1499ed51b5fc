"""What ``detkd show`` draws for one dataset image, computed through the engine's own parts.

The student (and teacher) run on the image as in evaluation; the student's matching comes from
``model.match`` (the detector contract), the regions and pairs from the recipe's pairers
(``distill.pairers``) called exactly as a distillation step calls them. Nothing here knows a family:
a region pairer gives a heat map over the student's grid (its dense predictions, or its FPN maps
for a sparse student), a matched pairer gives (student, teacher) prediction pairs, and initial
queries that a generator produced (``Predictions.generated_anchors``) are anchors.
All boxes are in network-input pixels of the unpadded image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.errors import ConfigError, DataError
from distill.structures import DenseOutputs, Detections, Target

DEFAULT_REGIONS = ("main", "vlr", "gt_boxes")  # a dense run whose recipe has no region: LD's three
MAX_PAIRS = 12  # linked boxes drawn per pairer (the heaviest pairs): more hide the image


@dataclass
class RegionMap:
    """A region's (N,) weights over a grid of ``level_sizes`` (H_l, W_l) at ``strides``."""

    name: str
    weights: np.ndarray
    level_sizes: list[tuple[int, int]]
    strides: list[int]

    def level(self, l: int) -> np.ndarray:
        """(H_l, W_l) weights of level ``l`` (row-major, as the grid is flattened)."""
        start = sum(h * w for h, w in self.level_sizes[:l])
        h, w = self.level_sizes[l]
        return self.weights[start:start + h * w].reshape(h, w)


@dataclass
class PairView:
    """A matched pairer's pairs: student box, teacher box, the student's GT (or NaN), weight."""

    name: str
    student: np.ndarray  # (R, 4)
    teacher: np.ndarray  # (R, 4)
    gt: np.ndarray  # (R, 4), NaN rows where the student prediction matched no GT
    weight: np.ndarray  # (R,)


@dataclass
class ShowView:
    image: np.ndarray  # (h, w, 3) uint8, network input without padding
    image_id: int
    classes: list[str]
    target: Target
    student: Detections
    student_name: str
    teacher: Detections | None = None
    teacher_name: str | None = None
    regions: list[RegionMap] = field(default_factory=list)
    pairs: list[PairView] = field(default_factory=list)
    anchors: np.ndarray | None = None  # (A, 4) generated anchors


def find_index(dataset, image_id: int, where: str) -> int:
    try:
        return dataset.image_ids.index(image_id)
    except ValueError:
        ids = dataset.image_ids
        span = f"ids {ids[0]}..{ids[-1]}" if ids else "no images"
        raise DataError(f"{where}: no image id {image_id} ({len(ids)} images, {span})") from None


def input_pixels(image: Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """Normalised (3, H, W) -> (h, w, 3) uint8 of the unpadded image."""
    from distill.data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.float().cpu() * std + mean).clamp(0, 1) * 255
    h, w = size_hw
    return pixels[:, :h, :w].permute(1, 2, 0).round().to(torch.uint8).numpy()


def recipe_pairers(recipe_dict: dict | None, source: str) -> list:
    """The distinct pairers of a recipe's losses, in recipe order."""
    from distill.config import recipe_from_dict
    from distill.pairers import create_pairer

    if not recipe_dict:
        return []
    recipe = recipe_from_dict(recipe_dict, source)
    pairers = []
    for i, spec in enumerate(recipe.losses):
        try:
            pairer = create_pairer(spec.pairer, **dict(spec.pairer_params))
        except ConfigError as exc:
            raise ConfigError(f"{source}: losses[{i}]: {exc}") from None
        if pairer not in pairers:
            pairers.append(pairer)
    return pairers


@torch.no_grad()
def build_view(run: Path, data: Path, image_id: int, split: str = "val", teacher_path: Path | None = None) -> ShowView:
    from distill.checkpoint import require_meta, resolve_checkpoint
    from distill.data import DetectionTransform, collate, load_dataset
    from distill.inputs import DistillInputs
    from distill.pairers import RegionPairer, create_pairer
    from students.saved import load_detector
    from teachers.checks import check_same_classes

    path = resolve_checkpoint(run)
    student, meta = load_detector(path)
    require_meta(meta, path, "image_size")
    dataset = load_dataset(data, split, DetectionTransform(meta["image_size"], hflip_prob=0.0))
    check_same_classes(meta["classes"], dataset.classes, what=str(path), where=str(data))
    index = find_index(dataset, image_id, f"{data} [{split}]")
    sample = dataset.get(index, False)
    batch = collate([sample], size_divisor=meta.get("size_divisor", 32))
    sizes = batch.image_sizes
    features = student.features(batch.images)
    predictions = student.head(features, sizes)
    matches = student.match(predictions, batch.targets, sizes)
    s_in = DistillInputs(student.spec, predictions, features, matches, sizes)
    h, w = (int(v) for v in sizes[0])
    view = ShowView(
        image=input_pixels(batch.images[0], (h, w)), image_id=image_id, classes=list(meta["classes"]), target=sample.target,
        student=student.postprocess(predictions, sizes)[0], student_name=_run_name(path),
    )

    pairers = recipe_pairers(meta.get("recipe"), str(path))
    regions = [p for p in pairers if isinstance(p, RegionPairer)]
    # a dense head's own grid, else the FPN grid (regions that serve a sparse student's features)
    space = "predictions" if isinstance(predictions, DenseOutputs) else "features"
    if not regions and space == "predictions":
        regions = [create_pairer(name) for name in DEFAULT_REGIONS]
    for pairer in regions:
        try:
            pairer.check(student.spec, student.spec, space)  # the pairer's own rule (main / vlr need dense matches)
        except ConfigError:
            continue
        points, strides, valid = s_in.grid(space)
        mask = pairer.region(points, strides, batch.targets, matches, valid)[0]
        level_sizes = predictions.level_sizes if space == "predictions" else s_in.feature_sizes()
        view.regions.append(RegionMap(str(pairer), mask.float().cpu().numpy(), [tuple(s) for s in level_sizes], list(student.spec.strides)))

    anchors = predictions.generated_anchors()
    if anchors is not None:
        view.anchors = anchors[0].float().cpu().numpy()

    if teacher_path is None:
        teacher_path = _recorded_teacher(meta)
        if teacher_path is not None and not teacher_path.exists():
            from distill.report import warn

            warn(f"{path}: its teacher {teacher_path} is gone; pass --teacher T to draw the teacher's side")
            teacher_path = None
    if teacher_path is not None:
        _add_teacher(view, teacher_path, meta, dataset, batch, s_in, student, [p for p in pairers if not isinstance(p, RegionPairer)])
    return view


def _add_teacher(view: ShowView, teacher_path: Path, meta: dict, dataset, batch, s_in, student, matched: list) -> None:
    from distill.engine.distiller import shared_sides
    from teachers import load_teacher
    from teachers.checks import class_index_for

    teacher = load_teacher(teacher_path)
    index = class_index_for(dataset.classes, teacher.classes, _class_map(meta), where=str(teacher.meta.get("path", teacher_path)))
    if index is not None:
        teacher.class_index = torch.tensor(index, dtype=torch.long)
    needs = frozenset({"head", "matches"}).union(*(p.teacher_needs for p in matched))
    t_in = teacher.inputs(batch, s_in, needs)
    view.teacher = teacher.model.postprocess(t_in.predictions, batch.image_sizes)[0]
    view.teacher_name = _run_name(Path(teacher.meta.get("path", teacher_path)))
    shared = {}
    if any(p.shared_student for p in matched):
        losses = [SimpleNamespace(pairer=p, heads="last") for p in matched if p.shared_student]
        shared = shared_sides(losses, student, s_in.features, t_in, batch.image_sizes)
    for pairer in matched:
        side, their = (shared[pairer].student, shared[pairer].teacher) if pairer in shared else (s_in, t_in)
        pairs = pairer(side, their, batch.targets, "predictions")
        order = torch.argsort(pairs.weight, descending=True)[:MAX_PAIRS]
        s_idx, t_idx = pairs.student[order], pairs.teacher[order]
        gt = np.full((len(order), 4), np.nan, dtype=np.float32)
        if side is s_in and s_in.matches is not None:
            gt_of = dict(zip(s_in.matches.pred_index[0].tolist(), s_in.matches.gt_index[0].tolist()))
            boxes = batch.targets[0].boxes
            for r, s in enumerate(s_idx.tolist()):
                if s in gt_of:
                    gt[r] = boxes[gt_of[s]].float().cpu().numpy()
        view.pairs.append(PairView(
            str(pairer), side.predictions.boxes[0, s_idx].float().cpu().numpy(), their.predictions.boxes[0, t_idx].float().cpu().numpy(),
            gt, pairs.weight[order].float().cpu().numpy(),
        ))


def _recorded_teacher(meta: dict) -> Path | None:
    teacher = meta.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("path"), str):
        return Path(teacher["path"])
    return None


def _class_map(meta: dict) -> dict[str, Any]:
    teacher = (meta.get("recipe") or {}).get("teacher") or {}
    return teacher.get("class_map") or {}


def _run_name(checkpoint: Path) -> str:
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.stem
