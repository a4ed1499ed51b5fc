"""Tiny sparse-detector settings and batches shared by the tests/test_asag_*.py files."""
import torch

from distill.structures import Target

# A slim model: 32-ch P3-P5 FPN on MobileNetV3-small-0.5, 12 queries, 4 heads, tiny FFN.
TINY = dict(
    backbone="mobilenetv3_small_050",
    num_classes=3,
    strides=(8, 16, 32),
    fpn_channels=32,
    num_queries=12,
    ffn_dim=64,
    dynamic_dim=8,
    num_heads=4,
    roi_canonical=48.0,
    pretrained=None,
)
SIZE = 64


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def image_sizes(batch: int = 3) -> torch.Tensor:
    """Image 1 is smaller than the canvas (bottom / right padding)."""
    sizes = torch.full((batch, 2), SIZE, dtype=torch.long)
    if batch > 1:
        sizes[1] = torch.tensor([48, 56])
    return sizes


def targets() -> list[Target]:
    """Image 0 empty, image 1 one GT, image 2 three GTs (input pixels of a 64 x 64 image)."""
    several = Target(
        boxes=torch.tensor([[2.0, 3.0, 30.0, 40.0], [20.0, 20.0, 62.0, 60.0], [40.0, 5.0, 60.0, 20.0]]),
        labels=torch.tensor([0, 2, 1]),
    )
    one = Target(boxes=torch.tensor([[8.0, 8.0, 50.0, 40.0]]), labels=torch.tensor([1]))
    return [Target.empty(), one, several]


# The same slim size for DAB-DETR (its width is hidden_dim; no RoI or dynamic-conv sizes).
TINY_DAB = dict(
    backbone="mobilenetv3_small_050",
    num_classes=3,
    strides=(8, 16, 32),
    hidden_dim=32,
    num_queries=12,
    ffn_dim=64,
    num_heads=4,
    decoder_layers=2,
    encoder_layers=1,
    pretrained=None,
)


def tiny_params(name: str) -> dict:
    """Slim keyword arguments of the registered sparse detector ``name``."""
    if name == "dab_detr":
        return dict(TINY_DAB)
    extra = {"sampling_points": 8, "mixing_out_points": 16} if name == "asag_a" else {}
    return {**TINY, **extra}


def box_outputs(model) -> list:
    """The zero-initialised last box layers of a sparse detector (tests perturb them so gradients flow)."""
    if hasattr(model, "decoder") and hasattr(model.decoder, "box_head"):
        return [model.decoder.box_head.last]
    return [stage.reg_out for stage in [*model.stages, *model.heads]] + [model.proposal.reg_out]
