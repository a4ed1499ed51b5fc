"""Our GFL vs torchvision FCOS: training step and inference time with the same architecture.

Both detectors get a randomly initialised ResNet-18 (timm ``resnet18`` for ours, torchvision
``resnet18`` for FCOS), an FPN P3-P7 of the same width (torchvision ``BackboneWithFPN`` with
``LastLevelP6P7``, which also convolves the P5 output), heads with the same number of tower convs,
the same images, boxes, batch and SGD optimiser. Steps of the two models are interleaved so that
load from other processes hits both alike; the table shows medians after warm-up.

Inference = forward + post-processing (FCOS's own, incl. its input transform). Both use the same
score threshold (default 0: with random weights GFL scores sit at the 0.01 prior while FCOS's
sqrt(cls * centerness) is ~0.07, so any positive threshold would let only FCOS do NMS work),
top-1000 candidates per level, NMS IoU 0.6 and 100 detections.

    python benchmarks/gfl_vs_fcos.py --steps 10 --threads 2

On a machine shared with other jobs prefer ``--threads 1``: OpenMP threads that lose their core
stall each other, and single steps then take several times longer for either model.
"""
from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from common import interleaved_medians  # the benchmarks' shared helpers (this script's folder is on sys.path)
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from distill.structures import Target
from students import create_student

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160, help="square input size (px)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--head-convs", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--boxes", type=int, default=4, help="GT boxes per image")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--score-thresh", type=float, default=0.0)
    p.add_argument("--frozen-bn", action="store_true", help="FrozenBatchNorm2d in FCOS, norm_eval=True in GFL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top ops of one GFL training step")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gfl_vs_fcos.json"))
    return p.parse_args(argv)


def make_data(args: argparse.Namespace) -> tuple[Tensor, list[Target]]:
    """Raw images in [0, 1] and random boxes of 10-60 % of the image side."""
    g = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    targets = []
    for _ in range(args.batch):
        wh = (torch.rand(args.boxes, 2, generator=g) * 0.5 + 0.1) * args.size
        xy = torch.rand(args.boxes, 2, generator=g) * (args.size - wh)
        labels = torch.randint(0, args.num_classes, (args.boxes,), generator=g)
        targets.append(Target(torch.cat([xy, xy + wh], dim=1), labels))
    return images, targets


def build_gfl(args: argparse.Namespace) -> nn.Module:
    return create_student(
        "gfl",
        backbone="resnet18",
        num_classes=args.num_classes,
        fpn_channels=args.fpn_channels,
        head_convs=args.head_convs,
        norm_eval=args.frozen_bn,
        score_thresh=args.score_thresh,
    )


def build_fcos(args: argparse.Namespace) -> nn.Module:
    norm = FrozenBatchNorm2d if args.frozen_bn else nn.BatchNorm2d
    body = resnet18(weights=None, norm_layer=norm)
    ch = args.fpn_channels
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=ch,
        extra_blocks=LastLevelP6P7(ch, ch),  # in == out: P6 from the P5 output, like ours
    )
    return FCOS(
        backbone,
        args.num_classes,
        min_size=args.size,
        max_size=args.size,
        head=FCOSHead(ch, 1, args.num_classes, num_convs=args.head_convs),
        score_thresh=args.score_thresh,
        nms_thresh=0.6,
        detections_per_img=100,
        topk_candidates=1000,
    )


def gfl_steps(model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Callable[[], None]]:
    normalized = (images - MEAN) / STD
    sizes = torch.tensor([list(images.shape[-2:])] * len(images))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def train() -> None:
        model.train()
        losses, _ = model.loss(model(normalized), targets, sizes)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    @torch.inference_mode()
    def forward() -> None:
        model.eval()
        model(normalized)

    @torch.inference_mode()
    def inference() -> None:
        model.eval()
        model.postprocess(model(normalized), sizes)

    return {"train": train, "forward": forward, "inference": inference}


def fcos_steps(model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Callable[[], None]]:
    image_list = list(images)
    tv_targets = [{"boxes": t.boxes, "labels": t.labels} for t in targets]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def train() -> None:
        model.train()
        losses = model(image_list, tv_targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    @torch.inference_mode()
    def forward() -> None:
        model.eval()
        batch, _ = model.transform(image_list)
        model.head(list(model.backbone(batch.tensors).values()))

    @torch.inference_mode()
    def inference() -> None:
        model.eval()
        model(image_list)

    return {"train": train, "forward": forward, "inference": inference}


def profile_gfl_train(step: Callable[[], None]) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, targets = make_data(args)
    models = {"gfl (ours)": build_gfl(args), "fcos (torchvision)": build_fcos(args)}
    steps = {"gfl (ours)": gfl_steps(models["gfl (ours)"], images, targets)}
    steps["fcos (torchvision)"] = fcos_steps(models["fcos (torchvision)"], images, targets)
    if args.profile:
        profile_gfl_train(steps["gfl (ours)"]["train"])

    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for mode in ("train", "forward", "inference"):
        medians = interleaved_medians({name: s[mode] for name, s in steps.items()}, repeats=args.steps, warmup=args.warmup)
        for name, seconds in medians.items():
            results[name][f"{mode}_ms"] = 1000 * seconds
    ours, theirs = results["gfl (ours)"], results["fcos (torchvision)"]
    ratios = {mode: ours[f"{mode}_ms"] / theirs[f"{mode}_ms"] for mode in ("train", "forward", "inference")}

    table = Table(title=f"GFL vs FCOS, ResNet-18, {args.size}px x {args.batch}, fpn {args.fpn_channels}, "
                        f"{args.head_convs} convs, {args.threads} threads (median of {args.steps})")
    table.add_column("model", no_wrap=True)
    table.add_column("params (M)", justify="right")
    for mode in ("train", "forward", "inference"):
        table.add_column(f"{mode} ms", justify="right")
    table.add_column("train img/s", justify="right")
    for name, model in models.items():
        r = results[name]
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        table.add_row(name, f"{n_params:.2f}", *(f"{r[f'{m}_ms']:.0f}" for m in ("train", "forward", "inference")),
                      f"{args.batch / r['train_ms'] * 1000:.1f}")
    table.add_row("ratio ours/theirs", "", *(f"{ratios[m]:.2f}" for m in ("train", "forward", "inference")), "")
    Console().print(table)

    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results_ms": results,
        "ratio_ours_over_theirs": ratios,
        "params_millions": {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in models.items()},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
