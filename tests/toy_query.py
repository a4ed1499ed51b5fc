"""A minimal query-based (DETR-family) detector, to prove the engine speaks sparse.

Fixed learned queries (a content embedding and a reference box each), one refinement step from the
P3 feature sampled at the reference centre plus a pooled context of every FPN level, Hungarian matching with scipy (focal + L1 + GIoU cost),
focal + L1 + GIoU losses normalised by the number of GT boxes. It implements only the detector
contract (``distill.detector``); importing this module registers it as student ``toy_query``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from distill.structures import Detections, DetectorSpec, Matches, Predictions, Target
from students.backbone import TimmBackbone
from students.gfl.fpn import FPN
from students.registry import is_student, register_student

STRIDES = (8, 16, 32, 64, 128)
COST = {"class": 2.0, "l1": 5.0, "giou": 2.0}


class ToyQuery(nn.Module):
    family = "sparse"
    strides = STRIDES

    def __init__(self, num_classes: int, num_queries: int = 12, channels: int = 16, backbone: str = "resnet10t"):
        super().__init__()
        self.num_classes, self.num_queries, self.fpn_channels = num_classes, num_queries, channels
        self.backbone = TimmBackbone(backbone)
        self.fpn = FPN(self.backbone.channels, channels)
        self.query = nn.Embedding(num_queries, channels)
        self.reference = nn.Parameter(torch.rand(num_queries, 4) * torch.tensor([0.8, 0.8, 0.2, 0.2]) + torch.tensor([0.1, 0.1, 0.2, 0.2]))
        self.mlp = nn.Sequential(nn.Linear(2 * channels, 2 * channels), nn.ReLU(), nn.Linear(2 * channels, num_classes + 4))
        nn.init.constant_(self.mlp[-1].bias[:num_classes], -2.0)
        nn.init.zeros_(self.mlp[-1].weight)
        self.score_thresh, self.max_detections = 0.05, 100
        self.config = {"name": "toy_query", "params": {}}

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec("sparse", self.num_classes, STRIDES, self.fpn_channels, None)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.backbone(images))

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets=None) -> Predictions:
        p3 = features[0]
        b = p3.shape[0]
        canvas = torch.tensor([p3.shape[-2] * STRIDES[0], p3.shape[-1] * STRIDES[0]], device=p3.device)
        sizes = (canvas.expand(b, 2) if image_sizes is None else image_sizes.to(p3.device)).float()  # (B, 2) h, w
        ref = self.reference.clamp(0.01, 0.99)  # (Q, 4) cxcywh, fractions of the image
        centre = ref[None, :, :2] * sizes.flip(-1)[:, None] / (canvas.flip(-1).float() / 2) - 1  # (B, Q, 2) in [-1, 1]
        sampled = F.grid_sample(p3, centre[:, :, None], align_corners=False)[..., 0].transpose(1, 2)  # (B, Q, C)
        context = sum(f.mean(dim=(2, 3)) for f in features)[:, None]  # (B, 1, C) image context from every level
        out = self.mlp(torch.cat([sampled + context, self.query.weight.expand(b, -1, -1)], dim=-1))  # (B, Q, C + 4)
        logits, delta = out[..., : self.num_classes], out[..., self.num_classes :]
        cxcywh = torch.cat([ref[None, :, :2] + 0.1 * delta[..., :2].tanh(), ref[None, :, 2:] * delta[..., 2:].clamp(-3, 3).exp()], dim=-1)
        scale = sizes.flip(-1).repeat(1, 2)[:, None]  # (B, 1, 4) w h w h
        boxes = box_convert(cxcywh, "cxcywh", "xyxy") * scale
        return Predictions(logits, boxes, torch.ones(b, self.num_queries, dtype=torch.bool, device=p3.device))

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> Predictions:
        return self.head(self.features(images), image_sizes)

    @torch.no_grad()
    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor | None = None) -> Matches:
        pred, gt = [], []
        for b, target in enumerate(targets):
            valid = predictions.valid[b].nonzero(as_tuple=True)[0]
            if len(target.boxes) == 0 or len(valid) == 0:
                pred.append(valid[:0])
                gt.append(valid[:0])
                continue
            cost = self.cost(predictions.logits[b, valid], predictions.boxes[b, valid], target, self._scale(predictions, image_sizes, b))
            r, c = linear_sum_assignment(cost.cpu().numpy())
            order = torch.as_tensor(r).argsort()
            pred.append(valid[torch.as_tensor(r)[order]])
            gt.append(torch.as_tensor(c, device=valid.device)[order])
        return Matches(pred, gt)

    @staticmethod
    def cost(logits: Tensor, boxes: Tensor, target: Target, scale: Tensor) -> Tensor:
        """(Q, C), (Q, 4) -> (Q, G): focal class cost + L1 on normalised boxes + (-GIoU)."""
        p = logits.float().sigmoid()[:, target.labels]  # (Q, G)
        focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
        l1 = torch.cdist(boxes.float() / scale, target.boxes.float() / scale, p=1)
        return COST["class"] * focal + COST["l1"] * l1 - COST["giou"] * generalized_box_iou(boxes.float(), target.boxes.float())

    @staticmethod
    def _scale(predictions: Predictions, image_sizes: Tensor | None, b: int) -> Tensor:
        if image_sizes is None:
            return predictions.boxes.new_ones(4)
        h, w = image_sizes[b].float().tolist()
        return predictions.boxes.new_tensor([w, h, w, h])

    def loss(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor | None = None):
        matches = self.match(predictions, targets, image_sizes)
        num_gt = max(sum(len(t.boxes) for t in targets), 1)
        onehot = torch.zeros_like(predictions.logits)
        for b, (p, g) in enumerate(zip(matches.pred_index, matches.gt_index)):
            onehot[b, p, targets[b].labels[g]] = 1.0
        valid = predictions.valid
        loss_cls = sigmoid_focal_loss(predictions.logits[valid], onehot[valid], reduction="sum") / num_gt
        b_idx = torch.cat([torch.full_like(p, b) for b, p in enumerate(matches.pred_index)])
        pred_boxes = predictions.boxes[b_idx, torch.cat(matches.pred_index)]
        gt_boxes = torch.cat([t.boxes[g] for t, g in zip(targets, matches.gt_index)])
        scale = torch.stack([self._scale(predictions, image_sizes, int(b)) for b in b_idx]) if len(b_idx) else pred_boxes.new_ones(0, 4)
        loss_l1 = ((pred_boxes - gt_boxes).abs() / scale).sum() / num_gt
        loss_giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / num_gt if len(b_idx) else pred_boxes.sum() * 0
        return {"loss_cls": loss_cls, "loss_l1": 5.0 * loss_l1, "loss_giou": 2.0 * loss_giou}, matches

    @torch.no_grad()
    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]:
        out = []
        for b in range(predictions.num_images):
            probs = predictions.logits[b].float().sigmoid()  # (Q, C)
            scores, flat = probs.flatten().topk(min(self.max_detections, probs.numel()))
            keep = scores > self.score_thresh
            scores, flat = scores[keep], flat[keep]
            h, w = image_sizes[b].tolist()
            boxes = predictions.boxes[b, flat // self.num_classes].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append(Detections(boxes, scores, flat % self.num_classes))
        return out


def toy_query(num_classes: int = 10, num_queries: int = 12, channels: int = 16, backbone: str = "resnet10t") -> ToyQuery:
    """The test-only query detector (see the module docstring)."""
    return ToyQuery(num_classes, num_queries, channels, backbone)


if not is_student("toy_query"):
    register_student(toy_query)
