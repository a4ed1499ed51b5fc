"""Hugging Face ``transformers`` DETR-family detectors (a ``save_pretrained`` folder) in the detector contract.

Loaded with ``AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True,
use_safetensors=True)``: nothing is downloaded and no pickle is read; the config's
``use_pretrained_backbone`` is switched off first (the folder's weights hold the backbone).

``family = "sparse"``: one prediction per object query.

- logits (B, Q, C): the class head; sigmoid (focal-loss) models as they are, softmax models (DETR:
  a last "no object" column) through :func:`~teachers.external.common.softmax_to_logits`;
- boxes (B, Q, 4): ``pred_boxes`` (cx, cy, w, h relative to the input canvas) as xyxy input pixels;
- aux: the earlier decoder layers, when the model returns them (``config.auxiliary_loss``).

The model runs once per batch, inside ``features``: its forward is one call (backbone, encoder and
decoder cannot be run separately across model classes), so ``features`` returns the encoder's output
maps (``(B, d_model, H / s, W / s)`` per stride; none for models that do not return them, e.g.
DAB-DETR) as a list that also carries the forward's outputs, which ``head`` reads. No ``pixel_mask``
is given: the teacher sees the zero-padded canvas, as the students do.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from distill.errors import CheckpointError
from distill.structures import Detections, DetectorSpec, Matches, Predictions, Target
from teachers.external.common import postprocess_scores, renormalize, softmax_to_logits

# model_type of the DETR-family detectors this wrapper reads (those the installed version has): each
# returns ``logits`` and normalised cxcywh ``pred_boxes`` per query. Tested on tiny random models:
# detr, conditional_detr, dab-detr, deformable_detr, rt_detr; rt_detr_v2 and d_fine share RT-DETR's outputs.
SUPPORTED = ("detr", "conditional_detr", "dab-detr", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine")


class EncoderMaps(list):
    """The encoder maps (a list of (B, C, H_l, W_l)) plus the model outputs of the same forward."""

    outputs = None


def supported_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    return [t for t in SUPPORTED if t in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES]


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "run.json").is_file()


def load_transformers(folder: str | Path) -> nn.Module:
    """The model saved in ``folder`` by ``save_pretrained``; CheckpointError (one line) when the folder
    is not a supported object-detection model or its weights are missing."""
    folder = Path(folder)
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{folder}: Hugging Face teachers need transformers: pip install 'detkd[hf]'") from None
    from transformers import AutoConfig, AutoModelForObjectDetection

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json: not a save_pretrained folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{folder}/config.json: not a JSON config") from None
    if model_type not in supported_types():
        raise CheckpointError(
            f"{folder}: model type {model_type!r} is not a supported object-detection model "
            f"(supported with transformers {transformers.__version__}: {', '.join(supported_types())})"
        )
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no .safetensors weights (save with save_pretrained; .bin pickles are not read)")
    transformers.utils.logging.set_verbosity_error()  # its loading bars and notes would break one-line errors
    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for key in ("use_pretrained_backbone",):
        if getattr(config, key, False):
            setattr(config, key, False)  # the backbone's weights are in the folder
    try:
        # dtype: the run's default float type, as every model a run builds (fp64 in a reference run);
        # transformers would otherwise keep the dtype the folder was saved in
        return AutoModelForObjectDetection.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                                           dtype=torch.get_default_dtype())
    except (OSError, ValueError, RuntimeError) as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: cannot load the model ({line})") from None


class TransformersTeacher(nn.Module):
    """A DETR-family ``*ForObjectDetection`` model as a frozen sparse teacher."""

    family: ClassVar[str] = "sparse"

    def __init__(self, model: nn.Module, classes: list[str], mean=None, std=None) -> None:
        super().__init__()
        self.model = model
        num_labels = int(model.config.num_labels)
        self.classes = list(classes)
        self.config = {"name": f"transformers:{type(model).__name__}", "params": {}}
        self.mean, self.std = tuple(mean or (0.485, 0.456, 0.406)), tuple(std or (0.229, 0.224, 0.225))
        model.eval()
        with torch.no_grad():
            probe = self._forward(torch.zeros(1, 3, 256, 320))
        width = probe["logits"].shape[-1]
        if width not in (num_labels, num_labels + 1):
            raise CheckpointError(f"{type(model).__name__}: {width} class logits for {num_labels} labels")
        self.softmax = width == num_labels + 1  # DETR: a last "no object" class
        self.strides, self.channels = _encoder_layout(probe["encoder_last_hidden_state"], 256, 320)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec("sparse", self.num_classes, self.strides, self.channels)

    def features(self, images: Tensor) -> EncoderMaps:
        """(B, 3, H, W) -> the encoder maps (B, d_model, H / s, W / s) per stride in ``spec.strides``
        (empty when the model returns no encoder output); the forward's outputs ride along."""
        outputs = self._forward(renormalize(images, self.mean, self.std))
        maps = EncoderMaps(_encoder_maps(outputs["encoder_last_hidden_state"], self.strides, *images.shape[-2:]))
        maps.outputs = outputs
        maps.canvas = images.shape[-2:]
        return maps

    def head(self, features: EncoderMaps, image_sizes: Tensor | None = None, targets=None) -> Predictions:
        """Predictions of the forward ``features`` ran: logits (B, Q, C), boxes (B, Q, 4) xyxy px, aux."""
        outputs = getattr(features, "outputs", None)
        if outputs is None:
            raise ValueError("a transformers teacher's head reads the outputs its own features() returned")
        height, width = features.canvas
        last = self._predictions(outputs["logits"], outputs["pred_boxes"], height, width)
        last.aux = [self._predictions(logits, boxes, height, width) for logits, boxes in outputs["aux"]]
        return last

    def _forward(self, pixel_values: Tensor) -> dict:
        """The model's outputs: logits, pred_boxes, encoder_last_hidden_state, and ``aux``, the
        (logits, boxes) of the earlier decoder layers. transformers computes those with labels only;
        for DETR (``config.auxiliary_loss``) they are its base model's intermediate states read by its
        shared heads, exactly as its own loss reads them; the other classes give none."""
        model = self.model
        if model.config.model_type == "detr" and model.config.auxiliary_loss:
            base = model.model(pixel_values=pixel_values)
            heads = lambda h: (model.class_labels_classifier(h), model.bbox_predictor(h).sigmoid())  # noqa: E731
            logits, boxes = heads(base.last_hidden_state)
            aux = [heads(h) for h in base.intermediate_hidden_states[:-1]]
            return {"logits": logits, "pred_boxes": boxes, "encoder_last_hidden_state": base.encoder_last_hidden_state, "aux": aux}
        out = model(pixel_values=pixel_values)
        return {"logits": out.logits, "pred_boxes": out.pred_boxes, "encoder_last_hidden_state": out.get("encoder_last_hidden_state"), "aux": []}

    def _predictions(self, logits: Tensor, boxes: Tensor, height: int, width: int) -> Predictions:
        logits = softmax_to_logits(logits, background=-1) if self.softmax else logits.float()
        cx, cy, w, h = boxes.float().unbind(-1)
        xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        return Predictions(logits=logits, boxes=xyxy, valid=valid)

    def match(self, predictions: Predictions, targets: list[Target], image_sizes: Tensor) -> Matches:
        """Hungarian matching with the sparse students' costs: a DETR teacher's own assignment rule."""
        from students.sparse.matcher import HungarianMatcher

        return HungarianMatcher()(predictions, targets, image_sizes)

    def postprocess(self, predictions: Predictions, image_sizes: Tensor) -> list[Detections]:
        return postprocess_scores(predictions, image_sizes, nms_iou=None)


def _level_grid(strides: tuple[int, ...], height: int, width: int) -> list[tuple[int, int]]:
    return [(-(-height // s), -(-width // s)) for s in strides]  # stride-2 convs round up


def _encoder_layout(hidden, height: int, width: int) -> tuple[tuple[int, ...], int | None]:
    """Strides and channels of the encoder output of a (height, width) probe: a (B, C, H, W) map, a
    list of them, or a (B, N, C) sequence of flattened levels (whose strides are the run of powers of
    two whose grids add up to N)."""
    if hidden is None:
        return (), None
    if isinstance(hidden, (list, tuple)):
        return tuple(height // h.shape[-2] for h in hidden), int(hidden[0].shape[1])
    if hidden.ndim == 4:
        return (height // hidden.shape[-2],), int(hidden.shape[1])
    tokens = hidden.shape[1]
    for first in (8, 16, 32, 4):
        for count in (1, 3, 4, 2, 5):
            strides = tuple(first * 2**i for i in range(count))
            if sum(h * w for h, w in _level_grid(strides, height, width)) == tokens:
                return strides, int(hidden.shape[-1])
    return (), None


def _encoder_maps(hidden, strides: tuple[int, ...], height: int, width: int) -> list[Tensor]:
    if hidden is None or not strides:
        return []
    if isinstance(hidden, (list, tuple)):
        return list(hidden)
    if hidden.ndim == 4:
        return [hidden]
    maps, start = [], 0
    for h, w in _level_grid(strides, height, width):
        maps.append(hidden[:, start:start + h * w].transpose(1, 2).reshape(hidden.shape[0], -1, h, w))
        start += h * w
    return maps


def image_normalisation(folder: Path) -> tuple[tuple | None, tuple | None]:
    """The (mean, std) the model was trained with, from the folder's preprocessor_config.json
    (RT-DETR / D-FINE: no normalisation, i.e. mean 0, std 1); (None, None) = ImageNet's."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a JSON file") from None
    if not cfg.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(cfg.get("image_mean") or ()) or None, tuple(cfg.get("image_std") or ()) or None


def wrap_transformers(model: nn.Module, classes: dict[int, str] | list[str] | None = None, folder: Path | None = None) -> TransformersTeacher:
    """A ``*ForObjectDetection`` instance -> its wrapper. ``classes``: label id -> name (default the
    config's ``id2label``)."""
    from teachers.external.files import column_names

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in supported_types():
        raise CheckpointError(f"{type(model).__name__}: model type {model_type!r} is not a supported object-detection model ({', '.join(supported_types())})")
    if classes is None:
        classes = {int(k): v for k, v in model.config.id2label.items()}
    elif isinstance(classes, list):
        classes = dict(enumerate(classes))
    mean, std = image_normalisation(folder) if folder is not None else (None, None)
    return TransformersTeacher(model, column_names(classes, list(range(int(model.config.num_labels)))), mean, std)
