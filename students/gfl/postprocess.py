"""Dense outputs -> per-image detections (shared by GFL students and GFL-style teachers)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from distill.ops.boxes import distance2bbox
from distill.ops.precision import compute_dtype
from distill.structures import DenseOutputs, Detections
from students.gfl.coder import integral
from students.gfl.head import valid_locations

__all__ = ["postprocess_dense"]


@torch.no_grad()
def postprocess_dense(
    outputs: DenseOutputs,
    image_sizes: Tensor,
    score_thresh: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou: float = 0.6,
    max_detections: int = 100,
) -> list[Detections]:
    """Multi-label decoding: every (location, class) pair is a candidate.

    Per level, the ``pre_nms_topk`` best pairs of each image (all images at once) are kept if their
    sigmoid score exceeds ``score_thresh``; their boxes are decoded, clipped to ``image_sizes``
    (B, 2) (height, width), merged over levels, and reduced by class-aware NMS to at most
    ``max_detections``. Locations on batch padding are never trained (no QFL there), so their
    arbitrary scores are ignored.
    """
    batch = image_sizes.shape[0]
    num_classes = outputs.num_classes
    valid = valid_locations(outputs.points, image_sizes, batch, outputs.grid)  # (B, N)
    rows = torch.arange(batch, device=outputs.points.device)[:, None]
    scores, labels, boxes = [], [], []
    start = 0
    counts = outputs.level_counts()
    for cls_l, reg_l, n in zip(outputs.logits.split(counts, dim=1), outputs.bin_logits.split(counts, dim=1), counts):
        level = slice(start, start + n)
        start += n
        prob = cls_l.to(compute_dtype()).sigmoid()  # (B, n, C)
        prob = prob * valid[:, level, None]
        top_scores, top_idx = prob.reshape(batch, n * num_classes).topk(min(pre_nms_topk, n * num_classes), dim=1)
        loc = top_idx // num_classes  # (B, k) pair index = location * C + class
        bins = reg_l[rows, loc]  # (B, k, 4, R+1)
        distances = integral(bins) * outputs.strides[level][loc][..., None]
        scores.append(top_scores)
        labels.append(top_idx % num_classes)
        boxes.append(distance2bbox(outputs.points[level][loc], distances))
    scores, labels, boxes = torch.cat(scores, 1), torch.cat(labels, 1), torch.cat(boxes, 1)  # (B, K, ...)
    sizes = image_sizes.to(boxes)
    limit = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)[:, None]  # (B, 1, 4) w h w h
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    detections = []
    for b in range(batch):
        keep = scores[b] > score_thresh
        s, l, bx = scores[b][keep], labels[b][keep], boxes[b][keep]
        kept = batched_nms(bx, s, l, nms_iou)[:max_detections]
        detections.append(Detections(boxes=bx[kept], scores=s[kept], labels=l[kept]))
    return detections
