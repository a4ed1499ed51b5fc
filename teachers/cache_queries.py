"""Teacher caches of sparse (query-based) teachers: every query row and the teacher's own matches.

A sparse teacher's predictions have no grid to select from and its matched pairers read all of
them (``teacher_set``) or its matches of the GT (``gt_bridged``), so a query cache stores, per image
variant, every query (index = query index, invalid ones flagged) and the teacher's Hungarian matches
of that image's GT — which depend only on the image and its GT, so they are fixed per variant.

Shard tensors (E entries, R query rows, M match rows)::

    entries     (E, 6) int64   image_id, variant code, query_start, query_count, match_start, match_count
    q.logits    (R, C) fp16    class logits (already mapped to the student's classes)
    q.boxes     (R, 4) fp32    xyxy input pixels
    q.valid     (R,)   uint8   1 for a real query, 0 for padding
    q.bins      (R, 4, K) fp16, q.centers (R, 2) fp32, q.spacing (R, 4) fp32   (distribution heads only)
    m.pred      (M,)   int32   the teacher's matched query of ...
    m.gt        (M,)   int32   ... this GT index

At train time :func:`stack_queries` rebuilds ordinary :class:`Predictions` and :class:`Matches` for
the batch (padded to its largest query count), so every loss and pairer reads them as it reads the
online teacher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import CheckpointError, ConfigError
from distill.inputs import DistillInputs
from distill.pairers import RegionPairer
from distill.structures import Batch, BoxBins, DetectorSpec, Matches, Predictions
from teachers.cache_layout import CacheLayout, register_layout
from teachers.cache_select import CacheSpec

QUERY_PARTS = (("query", ("q.logits", "q.boxes", "q.valid", "q.bins", "q.centers", "q.spacing")), ("match", ("m.pred", "m.gt")))


@torch.inference_mode()
def query_rows(teacher, batch: Batch) -> list[dict[str, Tensor]]:
    """Run a sparse frozen teacher on a canvas-padded batch; per image its query rows and matches (CPU)."""
    side = teacher.inputs(batch, None, frozenset({"head", "matches"}))
    p, m = side.predictions, side.matches
    rows = []
    for b in range(p.num_images):
        entry = {
            "q.logits": _half(p.logits[b]), "q.boxes": p.boxes[b].float().cpu(), "q.valid": p.valid[b].to(torch.uint8).cpu(),
            "m.pred": m.pred_index[b].to(torch.int32).cpu(), "m.gt": m.gt_index[b].to(torch.int32).cpu(),
        }
        if p.bins is not None:
            logits, centers, spacing = p.bins.rows(torch.full((p.num_predictions,), b), torch.arange(p.num_predictions))
            entry.update({"q.bins": _half(logits), "q.centers": centers.float().cpu(), "q.spacing": spacing.float().cpu()})
        rows.append(entry)
    return rows


def _half(t: Tensor) -> Tensor:
    out = t.detach().half().cpu()
    if not torch.isfinite(out).all():
        raise ConfigError("teacher outputs overflow float16 (|value| > 65504); the cache cannot store them")
    return out


def stack_queries(entries: list[dict[str, Tensor]], device: torch.device) -> tuple[Predictions, Matches]:
    """Per-image cached rows -> batch Predictions (B, Q_max, ...) padded with invalid queries, and Matches."""
    q_max = max(len(e["q.valid"]) for e in entries)

    def pad(name: str, fill: float = 0.0) -> Tensor:
        rows = [e[name] for e in entries]
        out = torch.full((len(rows), q_max, *rows[0].shape[1:]), fill, dtype=torch.float32)
        for b, r in enumerate(rows):
            out[b, : len(r)] = r.float()
        return out.to(device)

    valid = pad("q.valid").bool()
    bins = None
    if "q.bins" in entries[0]:
        bins = BoxBins(pad("q.bins"), pad("q.centers"), pad("q.spacing", 1.0))
    predictions = Predictions(pad("q.logits"), pad("q.boxes"), valid, bins)
    matches = Matches([e["m.pred"].long().to(device) for e in entries], [e["m.gt"].long().to(device) for e in entries])
    return predictions, matches


@register_layout
class QueryLayout(CacheLayout):
    """Every query row of a sparse teacher and its matches (see the module docstring).

    Record: canvas, num_classes (after the class mapping), bins (None without a distribution head).
    """

    kind = "queries"
    family = "sparse"
    parts = QUERY_PARTS

    # ------------------------------------------------------------------------------- build
    @classmethod
    def probe(cls, teacher, canvas: tuple[int, int], spec: CacheSpec) -> "QueryLayout":
        """No grid to probe: classes and bins are the teacher's spec."""
        return cls({"canvas": list(canvas), "kind": cls.kind, "num_classes": int(teacher.spec.num_classes), "bins": teacher.spec.bins})

    def batch_rows(self, teacher, matcher, batch: Batch, spec: CacheSpec) -> list[dict[str, Tensor]]:
        return query_rows(teacher, batch)

    def stored_rows(self, rows: list[dict[str, Tensor]]) -> tuple[int, int]:
        return sum(len(r["q.valid"]) for r in rows), 0

    # -------------------------------------------------------------------------------- read
    def detector_spec(self, fingerprint: dict) -> DetectorSpec:
        teacher = fingerprint["teacher"]
        return DetectorSpec(
            "sparse", int(self.record.get("num_classes") or teacher["num_classes"]), tuple(teacher["strides"]), teacher["fpn_channels"],
            self.record.get("bins"),
        )

    def request(self, fingerprint: dict, size_divisor: int) -> CacheSpec:
        return CacheSpec(tuple(fingerprint["variants"]), (), (), size_divisor, queries=True)

    def check_losses(self, cache, losses) -> None:
        for loss in losses:
            if "features" in loss.needs or isinstance(loss.pairer, RegionPairer):
                raise CheckpointError(
                    f"{cache.folder}: loss '{loss.name}' ({loss.pairer}) needs a dense teacher's rows or features; this cache holds a "
                    "sparse teacher's query rows and matches (for prediction losses with gt_bridged / teacher_set pairs)"
                )

    def inputs(self, cache, batch: Batch, student: DistillInputs, needs: frozenset[str], entries: list[dict[str, Tensor]]) -> DistillInputs:
        """Its predictions and matches as the online teacher gives them."""
        predictions, matches = stack_queries(entries, batch.images.device)
        return DistillInputs(cache.spec, predictions, None, matches, batch.image_sizes)
