"""Teachers that are not detkd runs: torchvision and Hugging Face transformers detectors.

A teacher reference (``--teacher`` on the command line, ``teachers.load_teacher`` in Python)::

    tv:ARCH=WEIGHTS[,classes=NAMES]    torchvision FCOS / RetinaNet / Faster R-CNN, e.g.
                                       tv:fcos_resnet50_fpn=fcos.pth (.pth read weights_only, or .safetensors)
    hf:FOLDER[,classes=NAMES]          a transformers save_pretrained folder (DETR family); a bare
                                       FOLDER with a config.json and no run.json is read the same way

``NAMES`` is a JSON / YAML file naming the teacher's label ids (a list, or ``{id: name}``); without it
the names come from the model (transformers ``id2label``; torchvision: COCO's for a 91-id head, else
the ids as strings, e.g. "1"). The dataset's classes are then matched to those names (recipe
``teacher.class_map``: dataset class -> teacher name, for names that differ), as for any teacher.

In Python, ``load_teacher`` also takes the model object itself (an ``nn.Module`` of a supported
kind), with ``classes=`` as above.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from distill.errors import CheckpointError


@dataclass(frozen=True)
class ExternalReference:
    """A parsed teacher reference: ``kind`` 'tv' | 'hf', the architecture (tv), the weights file or
    folder, and the class-name file."""

    kind: str
    arch: str | None
    path: Path
    classes: Path | None

    def __str__(self) -> str:
        """The reference with absolute paths (what a run records to be resumed from anywhere)."""
        head = f"tv:{self.arch}={self.path.resolve()}" if self.kind == "tv" else f"hf:{self.path.resolve()}"
        return head + (f",classes={self.classes.resolve()}" if self.classes else "")


def parse_reference(reference) -> ExternalReference | None:
    """The external teacher ``reference`` names, or None for a detkd checkpoint / run folder."""
    text = str(reference)
    classes = None
    if ",classes=" in text:
        text, names = text.rsplit(",classes=", 1)
        classes = Path(names)
    if text.startswith("tv:"):
        arch, sep, weights = text[3:].partition("=")
        if not sep or not arch or not weights:
            raise CheckpointError(f"{reference}: a torchvision teacher is tv:ARCH=WEIGHTS, e.g. tv:fcos_resnet50_fpn=fcos.pth")
        return ExternalReference("tv", arch, Path(weights), classes)
    if text.startswith("hf:"):
        return ExternalReference("hf", None, Path(text[3:]), classes)
    from teachers.external.transformers import is_hf_folder

    if is_hf_folder(Path(text)):
        return ExternalReference("hf", None, Path(text), classes)
    if classes is not None:
        raise CheckpointError(f"{reference}: ',classes=' applies to tv: and hf: teachers (a detkd checkpoint names its classes)")
    return None


def load_external(reference: ExternalReference) -> nn.Module:
    """The contract wrapper (an ``nn.Module`` with features / head / match / postprocess / spec) of
    the model ``reference`` names; CheckpointError (one line) for anything unusable."""
    from teachers.external.files import read_class_names

    names = read_class_names(reference.classes) if reference.classes else None
    if reference.kind == "tv":
        from teachers.external.torchvision import load_torchvision, wrap_torchvision

        return wrap_torchvision(load_torchvision(reference.arch, reference.path), names)
    from teachers.external.transformers import load_transformers, wrap_transformers

    if not reference.path.is_dir():
        raise CheckpointError(f"{reference.path}: Hugging Face teacher folder not found")
    return wrap_transformers(load_transformers(reference.path), names, folder=reference.path)


def wrap_model(model: nn.Module, classes=None) -> nn.Module:
    """A torchvision or transformers detector object -> its contract wrapper (the weights it has)."""
    from torchvision.models import detection

    if isinstance(model, (detection.FCOS, detection.RetinaNet, detection.FasterRCNN)):
        from teachers.external.torchvision import wrap_torchvision

        return wrap_torchvision(model, classes)
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        from teachers.external.transformers import wrap_transformers

        return wrap_transformers(model, classes)
    raise CheckpointError(
        f"{type(model).__name__}: not a detector detkd can use as a teacher "
        "(torchvision FCOS / RetinaNet / FasterRCNN, a transformers DETR-family model, or a detkd checkpoint)"
    )


def detector_for_data(reference: ExternalReference, data_classes: list[str], class_map: dict[str, str] | None = None) -> nn.Module:
    """The external detector with its outputs in ``data_classes`` order (matched by name, as a
    distillation matches them): what ``detkd eval`` scores on that data."""
    import torch

    from teachers.checks import class_index_for
    from teachers.frozen import FrozenTeacher

    model = load_external(reference)
    teacher = FrozenTeacher(model, {"classes": model.classes})
    index = class_index_for(data_classes, teacher.classes, class_map, where=str(reference))
    if index is not None:
        teacher.class_index = torch.tensor(index, dtype=torch.long)
    return teacher.detector
