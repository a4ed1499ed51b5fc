"""Pieces every external teacher shares: class-probability conversion, input renormalisation,
its own matching of the ground truth, post-processing."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distill.structures import Detections, Matches, Predictions, Target


def softmax_to_logits(logits: Tensor, background: int) -> Tensor:
    """(..., K) softmax logits with a background / no-object column -> (..., K - 1) per-class logits.

    The losses read a teacher's class scores as independent sigmoids. A softmax classifier's
    probability ``p_c`` of class c (the background column included in the normalisation) becomes the
    one-vs-rest logit ``log p_c - log(1 - p_c)``, so ``sigmoid`` of the result is exactly ``p_c``;
    the background column is dropped (its mass is what keeps every ``p_c`` low on background).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    keep = [c for c in range(logits.shape[-1]) if c != background % logits.shape[-1]]
    log_p = log_p[..., keep].clamp(max=-1e-6)  # p = 1 exactly would give an infinite logit
    return log_p - torch.log(-torch.expm1(log_p))


def probability_to_logits(log_p: Tensor) -> Tensor:
    """Log-probabilities (...) -> logits whose sigmoid is that probability (clamped below 1)."""
    log_p = log_p.clamp(max=-1e-6)
    return log_p - torch.log(-torch.expm1(log_p))


def renormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, 3, H, W) images normalised with detkd's ImageNet mean / std -> normalised with the teacher's
    own ``mean`` / ``std`` (identity when they are the same)."""
    if tuple(mean) == tuple(IMAGENET_MEAN) and tuple(std) == tuple(IMAGENET_STD):
        return images
    d_mean, d_std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    t_mean, t_std = (torch.tensor(list(v), dtype=images.dtype, device=images.device).view(1, 3, 1, 1) for v in (mean, std))
    return (images * d_std + d_mean - t_mean) / t_std


@torch.no_grad()
def best_iou_matches(predictions: Predictions, targets: list[Target]) -> Matches:
    """The teacher's own matching of the ground truth, for ``gt_bridged``: per GT the valid prediction
    whose box overlaps it most (IoU > 0; lowest index on ties). An external model carries no
    training-time assigner we could replay, and ``gt_bridged`` keeps only the best-IoU match anyway."""
    pred_index, gt_index = [], []
    for b, target in enumerate(targets):
        valid = predictions.valid[b].nonzero(as_tuple=True)[0]
        gt = target.boxes.to(predictions.boxes.device, predictions.boxes.dtype)
        if len(valid) == 0 or len(gt) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=predictions.boxes.device)
            pred_index.append(empty)
            gt_index.append(empty.clone())
            continue
        iou = box_iou(predictions.boxes[b, valid], gt)  # (V, G)
        best, arg = iou.max(dim=0)
        keep = best > 0
        pred_index.append(valid[arg[keep]])
        gt_index.append(torch.arange(len(gt), device=gt.device)[keep])
    return Matches(pred_index, gt_index)


@torch.no_grad()
def postprocess_scores(
    predictions: Predictions, image_sizes: Tensor, score_thresh: float = 0.05, nms_iou: float | None = 0.6,
    pre_nms_topk: int = 1000, max_detections: int = 100,
) -> list[Detections]:
    """Every (prediction, class) pair a candidate, scored by ``sigmoid(logits)``; the best
    ``pre_nms_topk`` above ``score_thresh`` per image, boxes clipped to the image, class-aware NMS
    (``nms_iou=None``: none, for set predictors such as DETR), at most ``max_detections``."""
    detections = []
    num_classes = predictions.num_classes
    for b in range(predictions.num_images):
        probs = predictions.logits[b].float().sigmoid() * predictions.valid[b, :, None]  # (P, C)
        scores, index = probs.flatten().topk(min(pre_nms_topk, probs.numel()))
        keep = scores > score_thresh
        scores, index = scores[keep], index[keep]
        labels, rows = index % num_classes, index // num_classes
        h, w = image_sizes[b].tolist()
        boxes = predictions.boxes[b, rows].float()
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
        if nms_iou is not None:
            kept = batched_nms(boxes, scores, labels, nms_iou)
        else:
            kept = torch.arange(len(scores), device=scores.device)
        kept = kept[:max_detections]
        detections.append(Detections(boxes[kept], scores[kept], labels[kept]))
    return detections


def canvas_sizes(image_sizes: Tensor | None, batch: int, height: int, width: int, device) -> Tensor:
    """(B, 2) image sizes; ``None`` means every image fills the (height, width) canvas."""
    if image_sizes is not None:
        return image_sizes
    return torch.tensor([[height, width]] * batch, dtype=torch.long, device=device)
