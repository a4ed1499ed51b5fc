"""CrossKD's pairs for query detectors: each query of the student's crossing state with the teacher's
decoder run from the same box.

A query student's training predictions carry the state entering its last decoder layer
(``SparsePredictions.crossing``: content and boxes, group 0). The ``crosskd_query`` loss runs the
teacher's last layer on that content (the crossed predictions) and compares them with the teacher's
whole decoder run from the same boxes (``DistillInputs.decoded``), so crossing query k answers decoded
row k by construction, as CrossKD pairs location n with location n. The pairs are the valid crossing
queries (student index = teacher index = k), weighted

- ``uniform``: 1 (the class term on every query, as CrossKD's class term on every location);
- ``confidence``: the decoded row's ``max_c p_t`` (the box terms where the teacher sees an object,
  as shared queries weight theirs).

These indices are crossing queries and decoded rows, not the two detectors' own predictions, so only
``crosskd_query`` may use this pairer (``Pairer.only_for``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.ops.precision import compute_dtype
from distill.pairers.base import Pairer
from distill.structures import DetectorSpec, Pairs, QueryCrossing, Target

WEIGHTINGS = ("confidence", "uniform")


def crossing_state(student: DistillInputs, reader: str) -> QueryCrossing:
    """The student's query state entering its last decoder layer, or a ValueError naming ``reader``."""
    crossing = getattr(student.require_predictions("the crossing state"), "crossing", None)
    if crossing is None:
        raise ValueError(f"{reader}: the student's predictions carry no crossing state (a training forward of a query detector keeps it)")
    return crossing


@dataclass(frozen=True)
class CrossedQueriesPairer(Pairer):
    weighting: str = "confidence"

    name = "crossed_queries"
    spaces = ("predictions",)
    teacher_needs = frozenset({"decode"})
    cache_refusal = "runs the teacher's decoder on the student's query boxes at every step, which no cache can hold"
    only_for = "crosskd_query"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"pairer 'crossed_queries': weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")

    def check(self, student: DetectorSpec, teacher: DetectorSpec, space: str) -> None:
        super().check(student, teacher, space)
        if not student.query_crossing:
            raise ConfigError(
                f"pairer 'crossed_queries' reads the query state entering the student's last decoder layer, but the student "
                f"({student.family}) exposes none (a query detector with image-dependent content there: ASAG, Sparse R-CNN, DAB-DETR of 2+ layers)"
            )
        if not teacher.query_boxes:
            raise ConfigError(f"pairer 'crossed_queries' runs the teacher's decoder from the student's boxes, but the teacher ({teacher.family}) cannot start from given boxes")

    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        crossing = crossing_state(student, "pairer 'crossed_queries'")
        image, k = crossing.valid.nonzero(as_tuple=True)
        if self.weighting == "uniform":
            weight = torch.ones(len(k), dtype=compute_dtype(), device=k.device)
        else:
            logits = teacher.decoded(crossing.boxes, crossing.valid).logits
            weight = logits[image, k].detach().to(compute_dtype()).sigmoid().amax(dim=-1)
        return Pairs(image, k, k, weight, crossing.valid.shape[0])

    def __str__(self) -> str:
        return f"crossed_queries({self.weighting})"
