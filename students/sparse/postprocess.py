"""Sparse detections: sigmoid scores, top-k over (query x class), optional class-wise NMS (spec §8)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from distill.ops.precision import compute_dtype
from distill.structures import Detections, Predictions

__all__ = ["postprocess_sparse"]


def postprocess_sparse(
    predictions: Predictions,
    image_sizes: Tensor | None,
    max_detections: int = 100,
    score_thresh: float = 0.0,
    nms_iou: float | None = None,
) -> list[Detections]:
    """Per image: the ``max_detections`` best (query, class) pairs of the valid queries.

    predictions: logits (B, Q, C), boxes (B, Q, 4) xyxy px, valid (B, Q). Boxes are clipped to the
    image ``image_sizes[b] = (h, w)`` (None: not clipped). One query may give several classes, as in
    DETR's top-100 over all entries; scores below ``score_thresh`` are dropped; ``nms_iou`` applies
    class-wise NMS on the kept set (the official code's 300-query setting uses 0.7; default none).
    Returns B ``Detections`` (K_b <= max_detections), scores descending.
    """
    scores = predictions.logits.detach().to(compute_dtype()).sigmoid()  # (B, Q, C)
    scores = scores * predictions.valid[..., None]
    num_classes = scores.shape[-1]
    out = []
    for b in range(scores.shape[0]):
        flat = scores[b].flatten()
        k = min(max_detections, flat.numel())
        top, index = flat.topk(k)
        query, label = index // num_classes, index % num_classes
        keep = (top > score_thresh) & predictions.valid[b, query]
        top, query, label = top[keep], query[keep], label[keep]
        boxes = predictions.boxes[b, query].detach().to(compute_dtype())
        if image_sizes is not None:
            h, w = image_sizes[b].tolist()
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
        if nms_iou is not None and len(top):
            kept = batched_nms(boxes, top, label, nms_iou)
            boxes, top, label = boxes[kept], top[kept], label[kept]
        out.append(Detections(boxes=boxes, scores=top, labels=label))
    return out
