"""COCO metrics of an exported ONNX student (``detkd eval FILE.onnx``), run by onnxruntime on the CPU.

The same batches, COCO conversion and metrics as ``distill.engine.evaluate`` for a checkpoint; each
batch is padded to the exported canvas. The graph treats the whole canvas as image: on square images
(which fill it) the detections are the checkpoint's; on others a detection may reach into the padding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.errors import CheckpointError
from distill.export.onnx_file import load_session, onnx_meta, run_session
from distill.structures import Detections

__all__ = ["read_onnx_meta", "evaluate_onnx"]


def read_onnx_meta(path: Path) -> dict[str, Any]:
    """The detkd record of an exported file; one line naming the file otherwise."""
    meta = onnx_meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: not an ONNX file written by detkd export (no readable 'detkd' metadata)")
    return meta


def evaluate_onnx(path: Path, dataset, batch_size: int = 16, progress=None, class_agnostic: bool = False) -> dict[str, float]:
    from distill.data import collate
    from distill.engine.evaluate import coco_metrics, to_coco_results

    meta = read_onnx_meta(path)
    side = int(meta["canvas"])
    batch_size = batch_size if meta.get("dynamic_batch") else 1  # a fixed-batch file takes one image
    session = load_session(path)
    results: list[dict[str, Any]] = []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset.get(i, flip=False) for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(samples, pad_to=(side, side))
        out = run_session(session, batch.images)
        detections = []
        for b in range(len(samples)):
            keep = torch.from_numpy(out["valid"][b])
            detections.append(Detections(boxes=torch.from_numpy(out["boxes"][b])[keep], scores=torch.from_numpy(out["scores"][b])[keep],
                                         labels=torch.from_numpy(out["labels"][b])[keep]))
        results.extend(to_coco_results(batch, detections, dataset.cat_ids))
        if progress is not None:
            progress(start + len(samples), len(dataset))
    return coco_metrics(dataset.coco, results, image_ids=dataset.image_ids, class_agnostic=class_agnostic)
