"""The module each family exports: images (B, 3, H, W) -> detections padded to a fixed count.

Only the inference path is traced (the model in eval mode): the teacher, feature adapters and
training-only heads (parallel heads, extra query groups, distillation queries) are not parts of a
student checkpoint's forward at inference, so they can never reach the graph. Images fill the
canvas (``image_sizes`` = the canvas), as in ``detkd predict`` for a square input.

Outputs (the names of the ONNX graph):
    boxes (B, D, 4) xyxy input pixels, scores (B, D), labels (B, D) int64, valid (B, D) bool —
    D = the model's ``max_detections`` (at most the candidates); invalid rows are zero.
    ``raw=True`` adds the head outputs: dense ``logits`` (B, N, C) and ``bin_logits`` (B, N, 4, R+1)
    on the flattened P3..P7 grid; sparse ``logits`` (B, Q, C) and ``query_boxes`` (B, Q, 4) px.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.export.graph_ops import clamped_k, padded_nms
from distill.ops.boxes import distance2bbox
from students.gfl.coder import integral

__all__ = ["DenseExport", "SparseExport", "export_module", "OUTPUTS", "RAW_OUTPUTS"]

OUTPUTS = ("boxes", "scores", "labels", "valid")
RAW_OUTPUTS = {"dense": ("logits", "bin_logits"), "sparse": ("logits", "query_boxes")}


def _clip(boxes: Tensor, height: int, width: int) -> Tensor:
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), limit)


class DenseExport(nn.Module):
    """GFL-style dense student: per level the ``pre_nms_topk`` best (location, class) pairs, decoded
    and clipped, then class-aware NMS to ``max_detections`` (``students.gfl.postprocess`` in the graph);
    a detector with ``refine_exported`` (RefineBox over a dense detector) refines the kept boxes."""

    def __init__(self, model: nn.Module, raw: bool = False) -> None:
        super().__init__()
        self.model, self.raw = model, raw

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        height, width = images.shape[-2], images.shape[-1]  # static: the exported canvas
        out = m.head(m.features(images), None)  # None: every location is inside the image
        num_classes = out.num_classes
        scores, labels, boxes, start = [], [], [], 0
        for cls_l, reg_l, n in zip(out.logits.split(out.level_counts(), 1), out.bin_logits.split(out.level_counts(), 1), out.level_counts()):
            points, strides = out.points[start : start + n], out.strides[start : start + n]
            start += n
            prob = cls_l.float().sigmoid().flatten(1)  # (B, n * C), pair index = location * C + class
            top, index = prob.topk(clamped_k(prob, m.pre_nms_topk, 1), dim=1)
            loc = torch.div(index, num_classes, rounding_mode="floor")
            bins = reg_l.gather(1, loc[..., None, None].expand(-1, -1, reg_l.shape[2], reg_l.shape[3]))  # (B, k, 4, R+1)
            distances = integral(bins) * strides[loc][..., None]
            scores.append(top)
            labels.append(index - loc * num_classes)
            boxes.append(distance2bbox(points[loc], distances))
        boxes = _clip(torch.cat(boxes, 1), height, width)
        boxes, scores, labels, valid = padded_nms(boxes, torch.cat(scores, 1), torch.cat(labels, 1), num_classes, m.nms_iou, m.score_thresh, m.max_detections)
        if hasattr(m, "refine_exported"):  # a refined dense detector: its refiner acts after the NMS, as in postprocess
            sizes = torch.ones_like(images[:, 0, 0, :2], dtype=torch.int64) * torch.tensor([height, width])
            boxes = m.refine_exported(out, boxes, scores, valid, sizes) * valid[..., None]
        return (boxes, scores, labels, valid) + ((out.logits, out.bin_logits) if self.raw else ())


class SparseExport(nn.Module):
    """Query detector (``QueryDetector``): top-``max_detections`` (query, class) pairs of the valid
    queries (``students.sparse.postprocess`` in the graph), then class-wise NMS when the model sets
    ``nms_iou``. The decoder runs the inference group only (eval mode: no extra groups, no aux heads)."""

    def __init__(self, model: nn.Module, raw: bool = False) -> None:
        super().__init__()
        self.model, self.raw = model, raw

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        height, width = images.shape[-2], images.shape[-1]
        # (B, 2) image sizes = the canvas, shaped from the batch in the graph (not a Python batch size).
        sizes = torch.ones_like(images[:, 0, 0, :2], dtype=torch.int64) * torch.tensor([height, width])
        pred = m.head(m.features(images), sizes)
        logits = pred.logits
        num_classes = logits.shape[-1]
        scores = (logits.float().sigmoid() * pred.valid[..., None]).flatten(1)  # (B, Q * C)
        top, index = scores.topk(clamped_k(scores, m.max_detections, 1), dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index - query * num_classes
        valid = (top > m.score_thresh) & pred.valid.gather(1, query)
        boxes = _clip(pred.boxes.float().gather(1, query[..., None].expand(-1, -1, 4)), height, width)
        if m.nms_iou is not None:
            result = padded_nms(boxes, torch.where(valid, top, torch.full_like(top, -1.0)), labels, num_classes, m.nms_iou, m.score_thresh, m.max_detections)
        else:
            result = (boxes * valid[..., None], torch.where(valid, top, torch.zeros_like(top)), labels * valid, valid)
        return result + ((pred.logits, pred.boxes) if self.raw else ())


def export_module(model: nn.Module, raw: bool = False) -> nn.Module:
    """The exported wrapper of a detector (its ``family``), in eval mode."""
    wrapper = {"dense": DenseExport, "sparse": SparseExport}[model.family](model.eval(), raw)
    return wrapper.eval()
