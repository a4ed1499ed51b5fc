"""Adaptive Sparse Anchor Generator: ASAG's first stage (Fu et al., ICCV 2023), batched.

It turns FPN maps into a *variable* set of image-specific anchors, padded per batch:

1. **Fixed patches.** P5 is compressed to ``compress_dim`` channels, its valid (unpadded) region is
   resized to a ``fixed_grid`` x ``fixed_grid`` map ignoring aspect ratio (so grid coordinates are
   normalised image coordinates), cut into four quadrant patches, and a stride-2 dilated conv of it
   gives the whole-image "P6" patch. A shared MLP predicts ``anchors_fixed`` anchors per patch:
   patch-normalised (cx, cy, w, h) after a sigmoid, plus a position-score logit.
2. **Adaptive probing**, P4 then P3 (strides 16, 8). Anchors whose score lies in the uncertain
   band (``score_low``, ``score_high``) and whose sides are below half a probe window are
   "small and unsure"; windows of ``probe_patch`` cells centred on them are de-duplicated by NMS
   (``patch_nms_iou``, per image), cropped from the compressed finer map and fed to a second shared
   MLP (``anchors_probe`` anchors per window). The selected anchors are *replaced* by these finer
   predictions (correct-and-replace); the others with score > ``keep_score`` are kept. When no
   anchor of the batch qualifies at inference, probing stops early (no finer map is even
   compressed). Per image, the output keeps between ``min_anchors`` and ``max_anchors`` anchors
   (top scores first), padded to the batch maximum with the full-image box and ``valid = False``.

Every step runs on the whole batch at once (windows are one gather, NMS is ``batched_nms``); the
only per-image state is an image index per window. Padding is zeroed before compression, so an
image gives the same anchors alone as in any batch.

Interface (B images, Q = most anchors of an image in the batch):

    gen = AnchorGenerator(in_channels=C)                     # defaults sized for 128-160 px input
    out = gen(features, image_sizes)                         # inference (targets=None)
    out = gen(features, image_sizes, targets)                # training: adds GT / random patches
    losses = gen.loss(out, targets, image_sizes)             # {"loss_anchor_cls", "_l1", "_giou"}

- ``features``: list ``[P3, P4, P5, ...]`` (extra levels ignored) or dict with keys ``p3, p4, p5``
  (any case); each (B, C, H_l, W_l) with strides 8, 16, 32. P6 is computed inside from P5.
- ``image_sizes``: (B, 2) (h, w) input pixels of each image inside the padding.
- ``targets``: list of B :class:`distill.structures.Target` (xyxy pixels) or None.
- Returns :class:`AnchorOutput`: ``boxes`` (B, Q, 4) xyxy input pixels, ``scores`` (B, Q)
  position-score logits, ``valid`` (B, Q) bool, ``source`` (B, Q) int64 (0 quadrant, 1 P6,
  2 P4 probe, 3 P3 probe, -1 padding), and the per-patch predictions the loss needs.

``boxes`` and ``scores`` are float32 whatever the feature dtype (autocast) and **detached**: the proposal block RoIAligns its content queries from
them, and (as in the reference) the generator learns only from its own patch losses, so decoder
gradients never flow into anchor coordinates through the sampling positions. The per-patch
predictions in ``fixed`` / ``probe`` keep their gradients for :meth:`AnchorGenerator.loss`.

Hyper-parameters (spec 2.1), ours for 128-160 px scenes with 1-4 objects of 13-64 px, and the
paper's COCO values (800-1333 px, :meth:`AnchorGenerator.coco`):

    parameter                 ours    COCO 100-q / 300-q   why ours
    fixed_grid (S_int)        8       30                   P5 is 4-5 cells: 8 resamples it ~1.6x, like 30 on ~25-40
    fixed patch (S/2)         4       15                   quadrants of 64-80 px
    probe_patch (p)           6       15                   windows 96 px at P4, 48 px at P3 (P4 is 8-10 cells)
    probing size limit p*s/2  48/24   120/60 px            the uncertain objects a window can hold
    anchors_fixed (N1)        10      50 / 150             50 candidates per image for <= 4 objects
    anchors_probe (N2)        5       20 / 50
    hidden_dim                256     1000                 token vectors of 128 / 288 values
    min/max anchors           5/60    5/200, 50/500
    score band, NMS, keep     0.1-0.7, 0.25, 0.1 (0.05 for 300-q): unchanged
    min_box_size              3 px    3 px

Cost (batch 16 scene images at 128 px, 32-channel FPN, 40 objects, 1 CPU thread, medians of 10):
a training step of the generator alone (forward with targets, loss, backward, AdamW) 17 ms, of
which Hungarian matching ~1.5 ms; inference 4.5 ms (33 anchors per image). A MobileNetV2-1.0 +
FPN step on the same batch takes 239 ms, so the generator is ~7% of backbone + FPN + generator.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from distill.ops.precision import compute_dtype
from distill.structures import Target
from students.sparse.asag.generator_ops import (
    SUPPRESSED_LOGIT,
    decode_patch_boxes,
    gather_windows,
    place_windows,
    rank_within_groups,
    resample_valid_region,
    valid_cell_mask,
)
from students.sparse.asag.generator_targets import GeneratorLossWeights, generator_loss, training_windows
from students.sparse.asag.generator_types import (
    AnchorOutput,
    Candidates,
    PatchPredictions,
    assemble_anchors,
    cat_patches,
    empty_patches,
    mark_kept,
)
from students.sparse.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh

__all__ = ["AnchorGenerator", "AnchorOutput", "GeneratorLossWeights", "PatchPredictions"]

STRIDES = (8, 16, 32)  # P3, P4, P5
SOURCE_QUADRANT, SOURCE_P6, SOURCE_P4, SOURCE_P3 = 0, 1, 2, 3


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, out_dim))


class AnchorGenerator(nn.Module):
    """Adaptive sparse anchors from FPN P3-P5 (see the module docstring for the data flow).

    Args:
        in_channels:     FPN channels C.
        compress_dim:    channels c after compression (spec 8).
        fixed_grid:      side S of the resized P5 map, even; fixed patches are S/2 x S/2.
        probe_patch:     side p of the probing windows in cells of P4 / P3.
        anchors_fixed:   N1 anchors per quadrant / P6 patch.
        anchors_probe:   N2 anchors per probing window.
        hidden_dim:      width of both 3-layer MLPs.
        score_low, score_high: the uncertain band (eta_l, eta_h) that triggers probing.
        patch_nms_iou:   IoU of the per-image NMS between candidate windows (eta_iou).
        keep_score:      anchors with score > keep_score are output (eta_f).
        min_anchors, max_anchors: per-image bounds on the output count.
        probe_levels:    2 = P4 and P3, 1 = P4 only, 0 = fixed patches only.
        max_probe_patches: cap on windows per image and level after NMS (None: no cap; the paper's
                         fast inference uses 15).
        min_probe_anchors: an image probes a level only when at least this many anchors qualify
                         (1: any; the paper's fast inference uses 3).
        min_train_patches: training windows per image and level (generated, then GT, then random).
        min_box_size:    anchors with a side below this (pixels) get a suppressed score.
        loss_weights:    term weights and matching costs (spec 2.7 defaults).
    """

    def __init__(self, in_channels: int, *, compress_dim: int = 8, fixed_grid: int = 8, probe_patch: int = 6,
                 anchors_fixed: int = 10, anchors_probe: int = 5, hidden_dim: int = 256,
                 score_low: float = 0.1, score_high: float = 0.7, patch_nms_iou: float = 0.25,
                 keep_score: float = 0.1, min_anchors: int = 5, max_anchors: int = 60, probe_levels: int = 2,
                 max_probe_patches: int | None = None, min_probe_anchors: int = 1, min_train_patches: int = 4,
                 min_box_size: float = 3.0,
                 loss_weights: GeneratorLossWeights | None = None) -> None:
        super().__init__()
        if fixed_grid % 2 or fixed_grid < 2:
            raise ValueError(f"fixed_grid must be even and >= 2, got {fixed_grid}")
        if not 0 <= min_anchors <= min(max_anchors, 5 * anchors_fixed):
            raise ValueError(f"need 0 <= min_anchors <= min(max_anchors, 5 * anchors_fixed), got {min_anchors}")
        if probe_levels not in (0, 1, 2):
            raise ValueError(f"probe_levels must be 0, 1 or 2, got {probe_levels}")
        self.compress_dim, self.fixed_grid, self.probe_patch = compress_dim, fixed_grid, probe_patch
        self.anchors_fixed, self.anchors_probe = anchors_fixed, anchors_probe
        self.score_low, self.score_high, self.patch_nms_iou = score_low, score_high, patch_nms_iou
        self.keep_score, self.min_anchors, self.max_anchors = keep_score, min_anchors, max_anchors
        self.probe_levels, self.max_probe_patches = probe_levels, max_probe_patches
        self.min_probe_anchors = min_probe_anchors
        self.min_train_patches, self.min_box_size = min_train_patches, min_box_size
        self.loss_weights = loss_weights or GeneratorLossWeights()
        q = fixed_grid // 2
        self.compress = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, max(in_channels // 2, 1), 1), nn.GELU(),
                          nn.Conv2d(max(in_channels // 2, 1), compress_dim, 3, padding=1))
            for _ in STRIDES)
        self.p6_conv = nn.Conv2d(compress_dim, compress_dim, 3, stride=2, padding=2, dilation=2)  # S -> S/2
        self.norm_fixed = nn.LayerNorm((q * q, compress_dim))
        self.norm_probe = nn.ModuleList(nn.LayerNorm((probe_patch ** 2, compress_dim)) for _ in range(2))
        self.pos_fixed = nn.Parameter(torch.zeros(q * q, compress_dim))
        self.pos_probe = nn.Parameter(torch.zeros(2, probe_patch ** 2, compress_dim))
        self.mlp_fixed = _mlp(q * q * compress_dim, hidden_dim, 5 * anchors_fixed)
        self.mlp_probe = _mlp(probe_patch ** 2 * compress_dim, hidden_dim, 5 * anchors_probe)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def coco(cls, in_channels: int = 256, num_query: int = 100) -> "AnchorGenerator":
        """The paper's COCO settings (spec 2.1): ``num_query`` 100 or 300."""
        many = num_query == 300
        return cls(in_channels, compress_dim=8, fixed_grid=30, probe_patch=15, anchors_fixed=150 if many else 50,
                   anchors_probe=50 if many else 20, hidden_dim=1000, keep_score=0.05 if many else 0.1,
                   min_anchors=50 if many else 5, max_anchors=500 if many else 200)

    # ------------------------------------------------------------------ forward
    def forward(self, features: list[Tensor] | dict[str, Tensor], image_sizes: Tensor,
                targets: list[Target] | None = None, *, gt_forcing: bool = False) -> AnchorOutput:
        """FPN maps -> padded anchors (+ per-patch predictions). Shapes in the module docstring.

        Passing ``targets`` selects the training behaviour (P6 flips, loss-only GT / random
        windows, no early stop), whatever ``self.training`` is. ``gt_forcing`` (training only,
        the reference's first epoch, spec 2.6) probes the GT windows instead of the generated
        ones, outputs their anchors, and replaces nothing.
        """
        levels = _levels(features)
        image_sizes = image_sizes.to(levels[0].device)
        _check_cover(levels, image_sizes)
        training = targets is not None
        gt_forcing = gt_forcing and training
        fixed, candidates = self._fixed_stage(levels[2], image_sizes, training)
        kept: list[Candidates] = []
        probes: list[PatchPredictions] = []
        windows_run: list[int] = []
        current, first = candidates, True
        for k, stride in enumerate((16, 8)[: self.probe_levels]):
            select = self._select(current, stride, image_sizes.shape[0])
            if not training and not bool(select.any()):
                break  # early stop: nothing small and unsure anywhere in the batch
            keep = (current.logits.sigmoid() > self.keep_score) & (~select | gt_forcing)
            kept.append(current.take(keep) if not first else mark_kept(current, keep))
            first = False
            top_left, image_index = self._generated_windows(current.take(select), image_sizes, stride)
            loss_only = torch.zeros_like(image_index, dtype=torch.bool)
            if training:
                top_left, image_index, loss_only = training_windows(
                    top_left, image_index, targets, image_sizes, stride, self.probe_patch,
                    self.min_train_patches, self.patch_nms_iou, gt_forcing=gt_forcing)
            level = 1 - k  # P4 is level 1, P3 level 0
            feats = self._compressed(levels[level], level, image_sizes)
            patch = self._probe(feats, image_index, top_left, stride, k)
            probes.append(patch)
            windows_run.append(len(image_index))
            current = self._probe_candidates(patch, image_sizes, SOURCE_P4 + k).take(
                (~loss_only)[:, None].expand(-1, self.anchors_probe).reshape(-1))
        final_keep = current.logits.sigmoid() > self.keep_score
        kept.append(mark_kept(current, final_keep) if first else current.take(final_keep))
        boxes, scores, valid, source = assemble_anchors(kept, image_sizes, self.min_anchors, self.max_anchors)
        probe = cat_patches(probes) if probes else empty_patches(levels[0], self.anchors_probe)
        return AnchorOutput(boxes, scores, valid, source, fixed, probe, windows_run)

    def _select(self, current: Candidates, stride: int, batch: int) -> Tensor:
        """(A,) bool: anchors to refine at this stride, small and in the uncertain score band.

        An image with fewer than ``min_probe_anchors`` such anchors probes nothing at this level
        (the paper's fast-inference rule with 3); its anchors are then kept, not replaced.
        """
        prob = current.logits.sigmoid()
        wh = current.boxes[:, 2:] - current.boxes[:, :2]
        limit = stride * self.probe_patch / 2
        select = (prob > self.score_low) & (prob < self.score_high) & (wh < limit).all(dim=1)
        if self.min_probe_anchors > 1:
            enough = torch.bincount(current.image[select], minlength=batch) >= self.min_probe_anchors
            select = select & enough[current.image]
        return select

    def loss(self, output: AnchorOutput, targets: list[Target], image_sizes: Tensor) -> dict[str, Tensor]:
        """Weighted anchor losses {"loss_anchor_cls", "loss_anchor_l1", "loss_anchor_giou"}: scalars.

        Per patch Hungarian matching against the GT whose centre lies in it, class-agnostic IoU
        soft-label quality focal loss, L1 and GIoU (see ``generator_targets.generator_loss``).
        Each of the two groups (fixed patches, probe windows) is normalised by
        max(matched pairs of the group, batch size), so the terms do not grow with the batch.
        """
        return generator_loss(output.fixed, output.probe, targets, image_sizes, self.loss_weights)

    # ------------------------------------------------------------------ stages
    def _compressed(self, x: Tensor, level: int, image_sizes: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, c, H, W), zero outside each image's cells.

        Masked after the pointwise block and after the 3x3 conv, so the 3x3 conv sees zeros
        beyond the image exactly as its own zero padding would on an uncropped lone image.
        """
        mask = valid_cell_mask(image_sizes, STRIDES[level], x.shape[2], x.shape[3]).to(x.dtype)
        pointwise, act, conv = self.compress[level]
        return conv(act(pointwise(x)) * mask) * mask

    def _tokens(self, patches: Tensor, norm: nn.LayerNorm, pos: Tensor) -> Tensor:
        """(..., c, h, w) -> (..., h * w * c) normalised tokens with position embedding."""
        tokens = patches.flatten(-2).transpose(-1, -2)  # (..., h*w, c)
        return (norm(tokens) + pos).flatten(-2)

    def _fixed_stage(self, p5: Tensor, image_sizes: Tensor, training: bool) -> tuple[PatchPredictions, Candidates]:
        """Quadrants + P6 (+ its 3 flips in training) -> (predictions, candidates of the image)."""
        grid = resample_valid_region(self._compressed(p5, 2, image_sizes), image_sizes, 32, self.fixed_grid)
        q, batch = self.fixed_grid // 2, p5.shape[0]
        quads = [grid[:, :, r:r + q, c:c + q] for r in (0, q) for c in (0, q)]  # TL, TR, BL, BR
        p6 = self.p6_conv(torch.relu(grid))  # (B, c, q, q)
        views = quads + [p6]
        if training:
            views += [p6.flip(-1), p6.flip(-2), p6.flip(-1, -2)]  # loss only: h, v, h+v
        patches = torch.stack(views, dim=1)  # (B, K, c, q, q)
        raw = self.mlp_fixed(self._tokens(patches, self.norm_fixed, self.pos_fixed))
        raw = raw.reshape(batch, len(views), self.anchors_fixed, 5)
        h, w = image_sizes[:, 0].to(compute_dtype()), image_sizes[:, 1].to(compute_dtype())
        zero = torch.zeros_like(w)
        regions = torch.stack([
            torch.stack((zero, zero, w / 2, h / 2), -1), torch.stack((w / 2, zero, w, h / 2), -1),
            torch.stack((zero, h / 2, w / 2, h), -1), torch.stack((w / 2, h / 2, w, h), -1),
        ] + [torch.stack((zero, zero, w, h), -1)] * (len(views) - 4), dim=1)  # (B, K, 4)
        flips = torch.tensor([[0, 0]] * 5 + [[1, 0], [0, 1], [1, 1]], dtype=torch.bool, device=p5.device)[: len(views)]
        kinds = torch.arange(len(views), device=p5.device) >= 4
        patch = PatchPredictions(
            logits=raw[..., 4].flatten(0, 1), boxes=raw[..., :4].sigmoid().flatten(0, 1),
            regions=regions.flatten(0, 1), image_index=torch.arange(batch, device=p5.device).repeat_interleave(len(views)),
            hflip=flips[:, 0].repeat(batch), vflip=flips[:, 1].repeat(batch), whole_image=kinds.repeat(batch),
            max_size=torch.full((batch * len(views),), float("inf"), device=p5.device),
            level=torch.where(kinds, 6, 5).repeat(batch))
        first5 = slice(0, 5)
        boxes = decode_patch_boxes(raw[:, first5, :, :4].detach().to(compute_dtype()).sigmoid().flatten(0, 1),
                                   regions[:, first5].flatten(0, 1))
        logits = self._suppress_small(boxes, raw[:, first5, :, 4].detach().to(compute_dtype()).flatten(0, 1))
        source = torch.tensor([SOURCE_QUADRANT] * 4 + [SOURCE_P6], device=p5.device)
        cand = Candidates(boxes.reshape(-1, 4), logits.reshape(-1),
                           patch.image_index.reshape(batch, -1)[:, first5].repeat_interleave(self.anchors_fixed, 1).reshape(-1),
                           source.repeat_interleave(self.anchors_fixed).repeat(batch))
        return patch, cand

    def _suppress_small(self, boxes: Tensor, logits: Tensor) -> Tensor:
        """logits (..., N) with SUPPRESSED_LOGIT where a side of boxes (..., N, 4) < min_box_size."""
        small = ((boxes[..., 2:] - boxes[..., :2]) < self.min_box_size).any(dim=-1)
        return torch.where(small, torch.full_like(logits, SUPPRESSED_LOGIT), logits)

    @torch.no_grad()
    def _generated_windows(self, selected: Candidates, image_sizes: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        """Selected anchors -> (top_left (M, 2) cells, image_index (M,)) after per-image NMS."""
        centers = 0.5 * (selected.boxes[:, :2] + selected.boxes[:, 2:])
        side = stride * self.probe_patch
        windows = cxcywh_to_xyxy(torch.cat((centers, centers.new_full(centers.shape, side)), dim=1))
        keep = batched_nms(windows, selected.logits.sigmoid(), selected.image, self.patch_nms_iou)
        if self.max_probe_patches is not None and len(keep):
            order, rank = rank_within_groups(selected.image[keep], selected.logits[keep])
            keep = keep[order[rank < self.max_probe_patches]]
        image_index = selected.image[keep]
        return place_windows(centers[keep], image_sizes[image_index], stride, self.probe_patch), image_index

    def _probe(self, feats: Tensor, image_index: Tensor, top_left: Tensor, stride: int, k: int) -> PatchPredictions:
        """Windows of a compressed map -> per-window predictions (M, N2)."""
        p = self.probe_patch
        tokens = gather_windows(feats, image_index, top_left, p)  # (M, p*p, c)
        tokens = (self.norm_probe[k](tokens) + self.pos_probe[k]).flatten(1)
        raw = self.mlp_probe(tokens).reshape(len(image_index), self.anchors_probe, 5)
        corner = top_left.to(feats.dtype) * stride
        m = len(image_index)
        false = torch.zeros(m, dtype=torch.bool, device=feats.device)
        return PatchPredictions(
            logits=raw[..., 4], boxes=raw[..., :4].sigmoid(), regions=torch.cat((corner, corner + p * stride), dim=1),
            image_index=image_index, hflip=false, vflip=false, whole_image=false,
            max_size=torch.full((m,), float(p * stride), device=feats.device),
            level=torch.full((m,), 4 - k, dtype=torch.long, device=feats.device))

    def _probe_candidates(self, patch: PatchPredictions, image_sizes: Tensor, source: int) -> Candidates:
        """Window predictions -> flat candidates; centres on padding and tiny boxes suppressed."""
        boxes = decode_patch_boxes(patch.boxes.detach().to(compute_dtype()), patch.regions)  # (M, N2, 4)
        logits = self._suppress_small(boxes, patch.logits.detach().to(compute_dtype()))
        centers = xyxy_to_cxcywh(boxes)[..., :2]
        hw = image_sizes[patch.image_index].to(boxes.dtype)  # (M, 2) (h, w)
        outside = (centers[..., 0] >= hw[:, None, 1]) | (centers[..., 1] >= hw[:, None, 0])
        logits = torch.where(outside, torch.full_like(logits, SUPPRESSED_LOGIT), logits)
        image = patch.image_index[:, None].expand_as(logits)
        return Candidates(boxes.reshape(-1, 4), logits.reshape(-1), image.reshape(-1),
                           torch.full_like(image.reshape(-1), source))


def _check_cover(levels: list[Tensor], image_sizes: Tensor) -> None:
    """Each map must cover the largest image at its stride (catches P4, P5, P6 passed as P3-P5)."""
    if image_sizes.numel() == 0:
        return
    h, w = image_sizes.max(0).values.tolist()
    for x, stride in zip(levels, STRIDES):
        if x.shape[2] < math.ceil(h / stride) or x.shape[3] < math.ceil(w / stride):
            raise ValueError(f"FPN map of stride {stride} is {tuple(x.shape[2:])}, too small for images up to "
                             f"{h}x{w}: pass [P3, P4, P5, ...] (strides 8, 16, 32) or a dict p3/p4/p5")


def _levels(features: list[Tensor] | dict[str, Tensor]) -> list[Tensor]:
    """[P3, P4, P5] from a list (P3 first) or a dict keyed p3/p4/p5 in any case."""
    if isinstance(features, dict):
        lower = {k.lower(): v for k, v in features.items()}
        missing = [k for k in ("p3", "p4", "p5") if k not in lower]
        if missing:
            raise KeyError(f"AnchorGenerator needs FPN maps p3, p4, p5; missing {missing}")
        return [lower["p3"], lower["p4"], lower["p5"]]
    if len(features) < 3:
        raise ValueError(f"AnchorGenerator needs at least 3 FPN maps (P3, P4, P5), got {len(features)}")
    return list(features[:3])
