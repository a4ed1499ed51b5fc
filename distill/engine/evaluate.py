"""COCO evaluation with pycocotools: run a detector over a split and score its detections."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from distill.errors import DataError
from distill.structures import Batch, Detections

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def iter_eval_batches(dataset, batch_size: int, size_divisor: int = 32) -> Iterator[Batch]:
    """Deterministic, unflipped batches in dataset order (evaluation never augments)."""
    from distill.data import collate

    for start in range(0, len(dataset), batch_size):
        samples = [dataset.get(i, flip=False) for i in range(start, min(start + batch_size, len(dataset)))]
        yield collate(samples, size_divisor=size_divisor)


def to_coco_results(batch: Batch, detections: list[Detections], cat_ids: list[int]) -> list[dict[str, Any]]:
    """Detections in input pixels -> COCO result dicts in original-image pixels (xywh)."""
    results = []
    for image_id, scale, det in zip(batch.image_ids, batch.scales.tolist(), detections):
        boxes = det.boxes.detach().cpu().double() / scale
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        for box, score, label in zip(xywh.tolist(), det.scores.tolist(), det.labels.tolist()):
            results.append(
                {"image_id": int(image_id), "category_id": int(cat_ids[label]), "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
            )
    return results


def coco_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: list[int] | None = None, class_agnostic: bool = False
) -> dict[str, float]:
    """The 12 standard COCO box metrics as fractions in [0, 1] (no detections: all zero).

    ``class_agnostic=True`` matches detections to ground truth regardless of class (pycocotools'
    ``useCats=0``): the gap between the two tells classification errors from localization and ranking.
    """
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.params.useCats = 0 if class_agnostic else 1
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats, 0.0)  # pycocotools reports -1 where a size bin has no GT
    return {name: float(v) for name, v in zip(METRIC_NAMES, stats)}


def check_scorable(dataset, split: str = "val") -> None:
    """Refuse a split that cannot score anything: no images, or images without one annotation
    (AP would be 0 of nothing, and a run would keep a meaningless 'best' checkpoint)."""
    where = getattr(dataset, "ann_file", f"{split} split")
    if len(dataset) == 0:
        raise DataError(f"{where}: the {split} split has no images; evaluation (and the best checkpoint) needs some")
    coco = getattr(dataset, "coco", None)
    if coco is not None and not coco.getAnnIds(imgIds=list(getattr(dataset, "image_ids", []))):
        raise DataError(
            f"{where}: the {split} split has {len(dataset)} images but no annotations; AP would be 0 of nothing "
            "(and the best checkpoint meaningless): annotate it or evaluate another split"
        )


@torch.no_grad()
def evaluate_detector(
    model: nn.Module, dataset, batch_size: int = 16, progress=None, class_agnostic: bool = False
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``dataset`` (a ``distill.data.CocoDetection``).

    ``progress`` is an optional callable ``(done, total)`` for a progress bar; ``class_agnostic`` as in
    :func:`coco_metrics`.
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    done = 0
    device = next(model.parameters()).device
    try:
        for batch in iter_eval_batches(dataset, batch_size):
            batch = batch.to(device) if device.type != "cpu" else batch
            outputs = model.head(model.features(batch.images), batch.image_sizes)  # the contract, not forward()
            detections = model.postprocess(outputs, batch.image_sizes)
            results.extend(to_coco_results(batch, detections, dataset.cat_ids))
            done += len(batch)
            if progress is not None:
                progress(done, len(dataset))
    finally:
        model.train(was_training)
    return coco_metrics(dataset.coco, results, image_ids=dataset.image_ids, class_agnostic=class_agnostic)
