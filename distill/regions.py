"""Distillation regions: which dense locations a loss looks at, and how much each one counts.

A region turns the student's matches and the ground truth into a ``(B, N)`` float mask over a
dense location grid, in the flatten order of :class:`~distill.structures.DenseOutputs` (level by
level, P3 first, row-major). ``0`` means "not distilled"; a positive value is the location's weight.
Invalid locations (batch padding, ``valid`` False) are always 0, and an image without ground truth
gives an all-zero row for every GT-dependent region. The dense pairer (``distill.pairers.dense``)
turns a region mask into pairs whose student and teacher index is the same location.

Built-in regions (names used by recipes):

- ``main``: the student's own positives (its dense ``Matches``), weight 1 — LD's "main region".
- ``vlr``: the valuable localization region of LD. A location is VLR for GT ``g`` when the DIoU of its
  square anchor (side ``8 * stride``) with ``g`` lies in ``[gamma * alpha_pos(g), alpha_pos(g))``,
  with ``alpha_pos`` the ATSS threshold from ``Matches.extras["pos_thresholds"]``. Among the GTs a location
  is VLR for, the one with the largest plain IoU is chosen; the weight is that IoU.
  ``metric="diou"`` (default) is true DIoU (``torchvision.ops.distance_box_iou``);
  ``metric="diou_iof_legacy"`` reproduces the official LD code, whose "DIoU" divides the
  intersection by the *anchor* area instead of the union (ld-gfl-spec §2.5). As in that code the VLR
  may overlap the positives; ``exclude_pos=True`` removes them.
- ``gt_boxes``: location centre strictly inside some GT box ("inside GT box" imitation), weight 1.
- ``all``: every valid location, weight 1.

Every region function takes ``(points, strides, targets, matches, valid)`` positionally and its
options as keyword-only arguments (``matches`` may be None for regions that do not read it:
``gt_boxes`` and ``all``, which therefore also work on the FPN grid of a sparse student); :func:`create_region` binds the options into a hashable :class:`Region`
so the engine can compute each distinct mask once per step.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torchvision.ops import box_iou, distance_box_iou

from distill.errors import ConfigError
from distill.ops.boxes import ANCHOR_SCALE, diou_iof_legacy, square_anchors
from distill.ops.precision import compute_dtype
from distill.structures import Matches, Target

VLR_METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "diou": distance_box_iou,
    "diou_iof_legacy": diou_iof_legacy,
}


@torch.no_grad()
def main_region(points: Tensor, strides: Tensor, targets: list[Target], matches: Matches | None, valid: Tensor) -> Tensor:
    """(B, N) float: 1 at the student's positive locations, 0 elsewhere. valid: (B, N) bool."""
    return (_require(matches, "main").positive_mask(valid.shape[1]) & valid).to(compute_dtype())


@torch.no_grad()
def all_region(points: Tensor, strides: Tensor, targets: list[Target], matches: Matches | None, valid: Tensor) -> Tensor:
    """(B, N) float: 1 at every valid (non-padding) location."""
    return valid.to(compute_dtype())


@torch.no_grad()
def gt_boxes_region(points: Tensor, strides: Tensor, targets: list[Target], matches: Matches | None, valid: Tensor) -> Tensor:
    """(B, N) float: 1 where the location centre lies strictly inside at least one GT box.

    points: (N, 2) xy centres in input pixels.
    """
    rows = []
    for target in targets:
        boxes = target.boxes.to(points)  # (G, 4)
        x, y = points[:, 0:1], points[:, 1:2]  # (N, 1) each, broadcast against (G,)
        inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])  # (N, G)
        rows.append(inside.any(dim=1))  # any() over G = 0 is False: empty GT -> empty mask
    mask = torch.stack(rows) if rows else valid.new_zeros(valid.shape)
    return (mask & valid).to(compute_dtype())


@torch.no_grad()
def vlr_region(
    points: Tensor,
    strides: Tensor,
    targets: list[Target],
    matches: Matches | None,
    valid: Tensor,
    *,
    gamma: float = 0.25,
    metric: str = "diou",
    exclude_pos: bool = False,
) -> Tensor:
    """(B, N) float: the IoU of each VLR location with its chosen GT, 0 elsewhere.

    points: (N, 2); strides: (N,); ``matches.extras["pos_thresholds"][b]``: (G_b,) alpha_pos per GT.
    """
    _check_vlr_params(gamma, metric)
    thresholds = _require(matches, "vlr").extras.get("pos_thresholds", [])
    if len(thresholds) != len(targets):
        raise ConfigError(
            f"region 'vlr' needs one ATSS threshold tensor per image (Matches.extras['pos_thresholds']), got "
            f"{len(thresholds)} for {len(targets)} images; use a detector with an ATSS-style assigner"
        )
    anchors = square_anchors(points.to(compute_dtype()), strides.to(compute_dtype()), ANCHOR_SCALE)  # (N, 4), as ATSS ranks them
    mask = _vlr_batch(anchors, targets, thresholds, gamma, VLR_METRICS[metric])
    mask = mask.reshape(valid.shape) * valid
    if exclude_pos:
        mask = mask * ~matches.positive_mask(valid.shape[1])
    return mask


def _vlr_batch(anchors: Tensor, targets: list[Target], thresholds: list[Tensor], gamma: float, metric: Callable) -> Tensor:
    """anchors (N, 4) -> (B, N): per image, the IoU with the chosen GT, 0 outside the band.

    The GTs of all images are scored against the anchors in one (N, G_total) call — one pair of
    IoU kernels per step instead of one per image — and each image then keeps its own columns.
    """
    for b, (target, alpha) in enumerate(zip(targets, thresholds)):
        if alpha.shape[0] != target.boxes.shape[0]:
            raise ValueError(f"vlr: image {b} has {alpha.shape[0]} ATSS thresholds for {target.boxes.shape[0]} GT boxes")
    num_images = len(targets)
    boxes = torch.cat([t.boxes.to(anchors) for t in targets]) if targets else anchors.new_zeros((0, 4))
    if boxes.shape[0] == 0:
        return anchors.new_zeros((num_images, anchors.shape[0]))
    alpha = torch.cat([a.to(anchors) for a in thresholds])  # (G,)
    owner = torch.repeat_interleave(
        torch.arange(num_images, device=anchors.device), torch.tensor([t.boxes.shape[0] for t in targets], device=anchors.device)
    )  # (G,) image of each GT
    score = metric(anchors, boxes)  # (N, G)
    in_band = (score >= gamma * alpha) & (score < alpha)
    # Largest IoU among the GTs of the same image this anchor is VLR for; -1 marks "none".
    candidate = torch.where(in_band, box_iou(anchors, boxes), torch.full_like(score, -1.0))  # (N, G)
    same_image = owner.unsqueeze(0) == torch.arange(num_images, device=anchors.device).unsqueeze(1)  # (B, G)
    per_image = torch.where(same_image.unsqueeze(1), candidate.unsqueeze(0), torch.full_like(candidate, -1.0))  # (B, N, G)
    return per_image.amax(dim=2).clamp(min=0)


def _check_vlr_params(gamma: float, metric: str) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ConfigError(f"region 'vlr': gamma must be a number in [0, 1], got {gamma!r}")
    if metric not in VLR_METRICS:
        raise ConfigError(f"region 'vlr': metric must be one of {sorted(VLR_METRICS)}, got {metric!r}")


def _require(matches: Matches | None, region: str) -> Matches:
    if matches is None:
        raise ConfigError(f"region {region!r} reads the student's dense matches, which this side does not have")
    return matches


RegionFn = Callable[..., Tensor]
# Regions that read the student's matches (so they need a dense student whose predictions are the grid).
READS_MATCHES = frozenset({"main", "vlr"})
REGIONS: dict[str, RegionFn] = {
    "main": main_region,
    "vlr": vlr_region,
    "gt_boxes": gt_boxes_region,
    "all": all_region,
}
_PARAM_CHECKS: dict[str, Callable[..., None]] = {
    "vlr": lambda gamma=0.25, metric="diou", exclude_pos=False: _check_vlr_params(gamma, metric),
}


@dataclass(frozen=True)
class Region:
    """A named region with bound options; hashable so equal regions can share one mask per step.

    Call as ``region(points (N, 2), strides (N,), targets, matches, valid (B, N)) -> (B, N) float``.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, points: Tensor, strides: Tensor, targets: list[Target], matches: Matches | None, valid: Tensor) -> Tensor:
        return REGIONS[self.name](points, strides, targets, matches, valid, **dict(self.params))

    @property
    def reads_matches(self) -> bool:
        return self.name in READS_MATCHES

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}({opts})" if opts else self.name


def list_regions() -> list[str]:
    return sorted(REGIONS)


def create_region(name: str, **params: Any) -> Region:
    """Bind options to a registered region; unknown names, options or values raise ConfigError."""
    if not isinstance(name, str) or name not in REGIONS:
        raise ConfigError(f"unknown distillation region {name!r}; available: {', '.join(list_regions())}")
    accepted = [
        p.name for p in inspect.signature(REGIONS[name]).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"region {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )
    if name in _PARAM_CHECKS:
        _PARAM_CHECKS[name](**params)
    return Region(name, tuple(sorted(params.items())))
