"""torchvision detection models (FCOS, RetinaNet, Faster R-CNN) wrapped in the detector contract.

The wrapper runs the model's own modules stage by stage and bypasses its ``GeneralizedRCNNTransform``:
the teacher sees exactly the student's input (detkd's resize and padding; the pixel normalisation is
converted to the model's ``transform.image_mean / image_std`` when they differ from ImageNet's).

- FCOS, RetinaNet -> ``family = "dense"``: predictions on the FPN location grid (:class:`DenseOutputs`,
  no box bins). FCOS's class score is torchvision's own ``sqrt(sigmoid(cls) * sigmoid(centerness))``,
  given as its logit. RetinaNet has A anchors per location; each location keeps the anchor with the
  highest class logit (so the grid is one prediction per location, like the students').
- Faster R-CNN -> ``family = "sparse"``: one prediction per RPN proposal (``num_proposals`` per image,
  padded with invalid rows), the box of its most likely class, softmax classes turned into per-class
  logits (:func:`~teachers.external.common.softmax_to_logits`, background column 0 dropped). Its box
  head runs on given boxes too (``decode_queries``: ``spec.query_boxes``).

Weights are never downloaded: builders get ``weights=None, weights_backbone=None`` and the state dict
comes from the user's file (:func:`~teachers.external.files.read_state_dict`).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from distill.errors import CheckpointError
from distill.structures import DenseOutputs, Detections, DetectorSpec, Matches, Predictions, Target
from teachers.external.common import best_iou_matches, canvas_sizes, postprocess_scores, probability_to_logits, renormalize, softmax_to_logits

KINDS = ("fcos", "retinanet", "fasterrcnn")
# torchvision's own builders (exactly the architecture a user fine-tuned) ...
BUILDERS = (
    "fcos_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
)
# ... and the same heads on other ResNets (torchvision's FPN recipe of each kind), e.g. fcos_resnet18_fpn.
GENERIC = re.compile(r"(fcos|retinanet|fasterrcnn)_(resnet18|resnet34|resnet50|resnet101)_fpn")
CLASS_WEIGHT = {  # state-dict key whose first dimension is (anchors x) classes
    "fcos": "head.classification_head.cls_logits.weight",
    "retinanet": "head.classification_head.cls_logits.weight",
    "fasterrcnn": "roi_heads.box_predictor.cls_score.weight",
}


def architectures() -> list[str]:
    return [*BUILDERS, "{fcos,retinanet,fasterrcnn}_resnet{18,34,50,101}_fpn"]


def kind_of(arch: str) -> str:
    """'fcos' | 'retinanet' | 'fasterrcnn' of an architecture name; CheckpointError if unknown."""
    if arch in BUILDERS or GENERIC.fullmatch(arch):
        return arch.split("_")[0]
    raise CheckpointError(f"tv:{arch}: unknown torchvision detection architecture (known: {', '.join(architectures())})")


def build_torchvision(arch: str, num_classes: int, norm_layer: type[nn.Module] = misc_nn_ops.FrozenBatchNorm2d, **kwargs) -> nn.Module:
    """A randomly initialised torchvision detector, nothing downloaded.

    ``num_classes`` counts torchvision's label ids (Faster R-CNN: background 0 included). ``norm_layer``
    applies to the generic ResNet builds (BatchNorm2d to train one from scratch); ``kwargs`` go to the
    detector class (``min_size``, ``max_size``, ``image_mean``, ...).
    """
    kind = kind_of(arch)
    if arch in BUILDERS:
        return getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    depth = GENERIC.fullmatch(arch).group(2)
    if kind == "fasterrcnn":
        backbone = resnet_fpn_backbone(backbone_name=depth, weights=None, norm_layer=norm_layer, trainable_layers=5)
        return detection.FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    backbone = resnet_fpn_backbone(
        backbone_name=depth, weights=None, norm_layer=norm_layer, trainable_layers=5, returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return (detection.FCOS if kind == "fcos" else detection.RetinaNet)(backbone, num_classes=num_classes, **kwargs)


def load_torchvision(arch: str, weights_path: str) -> nn.Module:
    """``arch`` built with the class count the weights file implies, then the weights loaded (strict,
    BatchNorm ``num_batches_tracked`` counters aside)."""
    from teachers.external.files import read_state_dict

    kind = kind_of(arch)
    state = read_state_dict(weights_path)
    key = CLASS_WEIGHT[kind]
    if key not in state:
        raise CheckpointError(f"{weights_path}: no {key!r}: not the weights of a torchvision {kind} model")
    outputs = int(state[key].shape[0])
    anchors = 9 if kind == "retinanet" else 1  # torchvision's RetinaNet: 3 sizes x 3 aspect ratios per location
    if outputs % anchors:
        raise CheckpointError(f"{weights_path}: {key} has {outputs} rows, not a multiple of {anchors} anchors")
    model = build_torchvision(arch, outputs // anchors)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise CheckpointError(f"{weights_path}: weights do not fit tv:{arch} ({detail}); is it the right architecture?")
    return model


class TorchvisionTeacher(nn.Module):
    """Base of the wrappers: the backbone + FPN as ``features``, strides measured once at build."""

    family: ClassVar[str]

    def __init__(self, model: nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.model = model
        self.classes = list(classes)
        self.config = {"name": f"torchvision:{type(model).__name__}", "params": {}}
        self.mean = tuple(model.transform.image_mean)
        self.std = tuple(model.transform.image_std)
        with torch.no_grad():
            probe = self.model.backbone(torch.zeros(1, 3, 256, 256))
        self.level_names = list(probe.keys())
        self.strides = tuple(256 // f.shape[-1] for f in probe.values())
        self.channels = int(self.model.backbone.out_channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec(self.family, self.num_classes, self.strides, self.channels, query_boxes=self.family == "sparse")

    def features(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) detkd-normalised images -> FPN maps (B, C, H / s, W / s), one per stride."""
        return list(self.model.backbone(renormalize(images, self.mean, self.std)).values())

    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> Matches:
        return best_iou_matches(predictions, targets)

    def _image_list(self, features: list[Tensor], image_sizes: Tensor | None) -> ImageList:
        """The ImageList torchvision's anchor generator / RPN read (canvas shape, image sizes)."""
        batch = features[0].shape[0]
        height, width = features[0].shape[-2] * self.strides[0], features[0].shape[-1] * self.strides[0]
        canvas = features[0].new_zeros(batch, 1, height, width)  # shape, dtype and device only
        sizes = canvas_sizes(image_sizes, batch, height, width, canvas.device)
        return ImageList(canvas, [tuple(s) for s in sizes.tolist()])


class DenseTorchvisionTeacher(TorchvisionTeacher):
    """FCOS / RetinaNet: ``head`` -> :class:`DenseOutputs` on the location grid.

    logits: (B, N, C) per class (FCOS: logit of sqrt(sigmoid(cls) * sigmoid(ctr))); boxes: (B, N, 4)
    xyxy px; points: (N, 2) anchor centres (torchvision puts them at ``x * stride``, a cell's corner,
    where detkd's grids use its centre: the same cell, the same flat index); strides: (N,); bins None,
    so LD and a cache of head rows need a teacher with box bins.
    """

    family = "dense"

    @torch.no_grad()
    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets=None) -> DenseOutputs:
        outputs = self.model.head(features)
        image_list = self._image_list(features, image_sizes)
        anchors = self.model.anchor_generator(image_list, features)[0]  # (sum H W A, 4), same for every image
        counts = [f.shape[-2] * f.shape[-1] for f in features]
        num_anchors = outputs["cls_logits"].shape[1] // sum(counts)
        cls = outputs["cls_logits"]  # (B, sum H W A, K)
        if "bbox_ctrness" in outputs:  # FCOS: torchvision scores with sqrt(cls * centerness)
            log_p = 0.5 * (nn.functional.logsigmoid(cls) + nn.functional.logsigmoid(outputs["bbox_ctrness"]))
            cls = probability_to_logits(log_p)
        batch = cls.shape[0]
        coder = self.model.box_coder  # FCOS: BoxLinearCoder.decode; RetinaNet: BoxCoder.decode_single
        decode = coder.decode_single if hasattr(coder, "decode_single") else coder.decode
        boxes = decode(outputs["bbox_regression"].reshape(-1, 4), anchors.repeat(batch, 1))
        boxes = boxes.reshape(batch, -1, 4)
        if num_anchors > 1:  # keep, per location, the anchor with the highest class logit
            cls_l, box_l, anc_l = [], [], []
            start = 0
            for n in counts:
                c = cls[:, start * num_anchors:(start + n) * num_anchors].reshape(batch, n, num_anchors, -1)
                bx = boxes[:, start * num_anchors:(start + n) * num_anchors].reshape(batch, n, num_anchors, 4)
                best = c.amax(dim=-1).argmax(dim=-1)  # (B, n)
                cls_l.append(c.gather(2, best[..., None, None].expand(-1, -1, 1, c.shape[-1])).squeeze(2))
                box_l.append(bx.gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2))
                anc_l.append(anchors[start * num_anchors:(start + n) * num_anchors].reshape(n, num_anchors, 4)[:, 0])
                start += n
            cls, boxes, anchors = torch.cat(cls_l, 1), torch.cat(box_l, 1), torch.cat(anc_l, 0)
        points = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2)
        strides = torch.cat([torch.full((n,), float(s), device=points.device) for n, s in zip(counts, self.strides)])
        sizes = torch.tensor([list(s) for s in image_list.image_sizes], device=points.device)  # (B, 2) h, w
        valid = (points[None, :, 0] < sizes[:, None, 1]) & (points[None, :, 1] < sizes[:, None, 0])
        return DenseOutputs(
            logits=cls, boxes=boxes, valid=valid, points=points, strides=strides,
            level_sizes=[(f.shape[-2], f.shape[-1]) for f in features],
        )

    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]:
        return postprocess_scores(predictions, image_sizes, nms_iou=0.6)


class FasterRCNNTeacher(TorchvisionTeacher):
    """Faster R-CNN: ``head`` -> :class:`Predictions` over RPN proposals.

    logits: (B, Q, C) per-class logits of the softmax box classifier (background dropped); boxes:
    (B, Q, 4) xyxy px of each proposal's most likely class; valid: (B, Q), False on padding rows.
    """

    family = "sparse"

    def __init__(self, model: nn.Module, classes: list[str], num_proposals: int = 100) -> None:
        super().__init__(model, classes)
        self.num_proposals = num_proposals
        model.rpn._post_nms_top_n["testing"] = num_proposals  # torchvision's default 1000 is a detection budget, not a KD one

    def _maps(self, features: list[Tensor]) -> OrderedDict:
        return OrderedDict(zip(self.level_names, features))

    @torch.no_grad()
    def head(self, features: list[Tensor], image_sizes: Tensor | None = None, targets=None) -> Predictions:
        image_list = self._image_list(features, image_sizes)
        proposals, _ = self.model.rpn(image_list, self._maps(features))
        boxes = torch.zeros(len(proposals), self.num_proposals, 4, device=features[0].device)
        valid = torch.zeros(len(proposals), self.num_proposals, dtype=torch.bool, device=features[0].device)
        for b, p in enumerate(proposals):
            boxes[b, : len(p)], valid[b, : len(p)] = p[: self.num_proposals], True
        return self.decode_queries(features, image_sizes, boxes, valid)

    @torch.no_grad()
    def decode_queries(self, features: list[Tensor], image_sizes: Tensor | None, boxes: Tensor, valid: Tensor, aux: bool = False) -> Predictions:
        """The box head on given boxes (B, K, 4) xyxy px -> Predictions (B, K, C); invalid rows kept
        (their outputs are never read)."""
        image_list = self._image_list(features, image_sizes)
        batch, k = boxes.shape[:2]
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(self._maps(features), list(boxes.float()), image_list.image_sizes)
        class_logits, regression = heads.box_predictor(heads.box_head(pooled))  # (B K, K_cls), (B K, K_cls 4)
        per_class = heads.box_coder.decode(regression, list(boxes.float())).reshape(batch * k, -1, 4)  # (B K, K_cls, 4)
        logits = softmax_to_logits(class_logits, background=0)  # (B K, C)
        best = logits.argmax(dim=-1) + 1  # the box of the most likely (non-background) class
        chosen = per_class[torch.arange(batch * k, device=boxes.device), best]
        return Predictions(logits=logits.reshape(batch, k, -1), boxes=chosen.reshape(batch, k, 4), valid=valid.clone())

    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]:
        return postprocess_scores(predictions, image_sizes, nms_iou=0.5)


def coco_names(count: int) -> dict[int, str] | None:
    """torchvision's COCO category names (label id -> name, shipped in its code: no download) for a
    91-id head, the label space of every COCO-trained torchvision detector; None otherwise."""
    if count != 91:
        return None
    names = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}


def wrap_torchvision(model: nn.Module, classes: dict[int, str] | list[str] | None = None) -> TorchvisionTeacher:
    """A torchvision FCOS / RetinaNet / FasterRCNN instance -> its contract wrapper.

    ``classes``: torchvision label id -> name (a list: entry i names id i); Faster R-CNN's id 0 is the
    background and never a class. Default: COCO's names for a 91-id head, else the ids as strings.
    """
    from teachers.external.files import column_names

    if isinstance(model, (detection.FCOS, detection.RetinaNet)):
        count, first = model.head.classification_head.num_classes, 0
    elif isinstance(model, detection.FasterRCNN):
        count, first = model.roi_heads.box_predictor.cls_score.out_features, 1
    else:
        raise CheckpointError(f"{type(model).__name__}: not a torchvision detector detkd can use as a teacher (FCOS, RetinaNet, FasterRCNN)")
    if isinstance(classes, list):
        if len(classes) > count:
            raise CheckpointError(f"{type(model).__name__}: {len(classes)} class names for {count} label ids")
        classes = dict(enumerate(classes))
    names = column_names(classes if classes is not None else coco_names(count) or {}, list(range(first, count)))
    if first:
        return FasterRCNNTeacher(model, names)
    return DenseTorchvisionTeacher(model, names)
