"""CrossKD for query detectors (``crosskd_query``): the student's queries finished by the teacher's last decoder layer.

The sparse form of :mod:`distill.losses.crosskd`. A query student's training forward keeps the state
entering its last decoder layer (``SparsePredictions.crossing``: content (B, Q, D_s) and boxes,
group 0). That content, through a Linear adapter when the widths differ, goes through the *frozen
teacher's* last decoder layer and heads at the same boxes on the teacher's own memory (its FPN maps
or encoded tokens): the crossed predictions (``DistillInputs.decoder_tail``). Their target is the
teacher's whole decoder run from the same boxes (``DistillInputs.decoded``: what it predicts for a
query that starts there), so crossing query k answers decoded row k (pairer ``crossed_queries``).
As in the dense form, the student is not asked to produce the teacher's outputs with its own smaller
layer, only content the teacher's layer turns into them.

- ``part="cls"``: quality-focal KD (:func:`~distill.losses.crosskd.qfl_kd_rows`) on every valid
  query (``pairer_params: {weighting: uniform}``), normalised by the student's matched queries.
- ``part="box"``: L1 (image-normalised) + GIoU between the crossed and the decoded boxes
  (:func:`~distill.losses.box.box_rows`, weights 5 and 2), pairs weighted by the teacher's
  confidence (``weighting: confidence``, the default) and normalised by their sum. Boxes rather than
  bins: the crossed layer starts from the student's box and the decoded one from the teacher's own
  refined box, so their bins are measured in different frames.

Gradients reach the student's layers before its last one (and its backbone and FPN) and the adapter;
the teacher's parameters are frozen. The student's last layer itself gets no gradient from this
term (it is the layer the teacher's replaces), as in CrossKD. No teacher cache can serve it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.losses.box import box_rows, pair_scales
from distill.losses.crosskd import qfl_kd_rows, student_positives
from distill.losses.kl import weighted_sum
from distill.losses.registry import DistillInputs, DistillLoss, check_same_classes, check_widths, register_loss, width_adapter
from distill.ops.precision import compute_dtype
from distill.pairers.crossed import crossing_state
from distill.structures import DetectorSpec, Pairs, Predictions, QueryCrossing

PARTS = ("cls", "box")


@register_loss
class CrossKDQuery(DistillLoss):
    """Decoder-crossing KD for query detectors (ASAG, Sparse R-CNN, DAB-DETR): ``part`` cls
    (quality-focal KD) or box (L1 + GIoU to the teacher's decoded boxes)."""

    name = "crosskd_query"
    needs = frozenset({"decode", "decoder_tail"})
    cache_refusal = "runs the teacher's last decoder layer on the student's queries at every step, which no cache can hold"

    def __init__(
        self,
        *,
        weight: float = 1.0,
        pairer: str = "crossed_queries",
        pairer_params: Mapping[str, Any] | None = None,
        part: str = "cls",
        beta: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ):
        super().__init__(weight=weight, pairer=pairer, pairer_params=pairer_params)
        if self.pairer.name != "crossed_queries":
            raise ConfigError(f"loss 'crosskd_query' pairs crossing queries with the teacher's decoded rows: pairer must be crossed_queries, got {pairer!r}")
        if part not in PARTS:
            raise ConfigError(f"loss 'crosskd_query': part must be one of {', '.join(PARTS)}, got {part!r}")
        for key, value in (("beta", beta), ("l1_weight", l1_weight), ("giou_weight", giou_weight)):
            if not (isinstance(value, (int, float)) and value >= 0 and (key != "beta" or value > 0)):
                raise ConfigError(f"loss 'crosskd_query': {key} must be {'> 0' if key == 'beta' else '>= 0'}, got {value!r}")
        self.adapter: nn.Module = width_adapter(self.name, student_channels, teacher_channels, nn.Linear)
        self.part = part
        self.beta, self.l1_weight, self.giou_weight = float(beta), float(l1_weight), float(giou_weight)
        self.student_channels, self.teacher_channels = student_channels, teacher_channels

    def check_pair(self, student: DetectorSpec, teacher: DetectorSpec) -> None:
        super().check_pair(student, teacher)  # the pairer's: the student exposes its crossing state, the teacher decodes given boxes
        if not teacher.query_crossing:
            raise ConfigError(
                f"loss 'crosskd_query': the teacher ({teacher.family}) cannot finish a decoder from a given query state "
                "(a query detector of detkd: ASAG, Sparse R-CNN, DAB-DETR of 2+ layers)"
            )
        if self.part == "cls":
            check_same_classes(self.name, student, teacher)
        widths = (student.fpn_channels, teacher.fpn_channels)
        check_widths(self.name, "query width", widths, (self.student_channels, self.teacher_channels), self.adapter, "Linear")

    def crossed(self, student: DistillInputs, teacher: DistillInputs, crossing: QueryCrossing) -> Predictions:
        """The teacher's last layer on the student's crossing state: Predictions (B, Q)."""
        if teacher.decoder_tail is None:
            raise ValueError("loss 'crosskd_query': the teacher side has no decoder_tail (it must be the online frozen teacher)")
        return teacher.decoder_tail(self._adapt(crossing.content.to(compute_dtype())), crossing.boxes, crossing.valid)

    def loss(self, student: DistillInputs, teacher: DistillInputs, pairs: Pairs) -> Tensor:
        crossing = crossing_state(student, f"loss {self.name!r}")
        crossed = self.crossed(student, teacher, crossing)
        target = teacher.decoded(crossing.boxes, crossing.valid)
        if self.part == "cls":
            rows = qfl_kd_rows(crossed.logits[pairs.image, pairs.student], target.logits[pairs.image, pairs.teacher], self.beta)
            return weighted_sum(rows, pairs.weight, student_positives(student, rows.device))
        return box_rows(crossed.boxes[pairs.image, pairs.student], target.boxes[pairs.image, pairs.teacher], pair_scales(student, pairs, self.name),
                        pairs.weight, self.l1_weight, self.giou_weight)

    def _adapt(self, x: Tensor) -> Tensor:
        """(B, Q, D_s) -> (B, Q, D_t) through the Linear adapter (identity with equal widths)."""
        if isinstance(self.adapter, nn.Identity):
            return x
        return F.linear(x, self.adapter.weight.to(compute_dtype()), self.adapter.bias.to(compute_dtype()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, part={self.part!r}, beta={self.beta}, l1_weight={self.l1_weight}, giou_weight={self.giou_weight}"
