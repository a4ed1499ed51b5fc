"""The pairer contract: which student row is compared with which teacher row, and how much it counts.

A pairer is a frozen (hashable) dataclass, so the engine computes each distinct pairer once per step
and every loss that uses it reads the same :class:`~distill.structures.Pairs`::

    pairer.check(student_spec, teacher_spec, space)        # at build time: ConfigError if it cannot serve
    pairs = pairer(student, teacher, targets, space)       # DistillInputs x2 -> Pairs

``space`` is what the pairs index: ``"predictions"`` (KD, LD, box losses) or ``"features"``
(flattened FPN locations, feature mimicking). ``teacher_needs`` names what the teacher side must
provide beyond what the losses read: ``"head"`` (its predictions) and/or ``"matches"`` (its own
matching of the batch's ground truth).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.structures import DetectorSpec, Pairs, Target

SPACES = ("predictions", "features")


class Pairer(ABC):
    """Base class of every pairer (subclasses are frozen dataclasses)."""

    name: ClassVar[str]
    spaces: ClassVar[tuple[str, ...]] = SPACES
    teacher_needs: ClassVar[frozenset[str]] = frozenset()
    # True: the student side is its decoder run on the teacher's boxes (``shared_queries``), which
    # the engine computes once per step; False: the student's own predictions.
    shared_student: ClassVar[bool] = False
    # Whether the teacher's decoder runs on this pairer's boxes at every step (random distillation points).
    teacher_decodes: ClassVar[bool] = False
    # Why no teacher cache can serve this pairer (None: a cache can, given the rows it needs).
    cache_refusal: ClassVar[str | None] = None
    # True when the pairs are exactly the student's positives (region main), where its quality
    # weight is defined (> 0): LD weights its rows by that weight there by default.
    on_student_positives: ClassVar[bool] = False
    # The one loss this pairer's indices make sense for (None: any), checked when a loss is built.
    only_for: ClassVar[str | None] = None
    # The constant the LD reference divides this pairer's summed LD term by (``ld`` loss, ``legacy``
    # mode): 4 for Main LD, 16 for VLR LD, 4 elsewhere.
    ld_reference_avg_factor: ClassVar[float] = 4.0

    def check(self, student: DetectorSpec, teacher: DetectorSpec, space: str) -> None:
        if space not in self.spaces:
            raise ConfigError(
                f"pairer {self.name!r} pairs {' and '.join(self.spaces)}, not {space}; "
                + ("feature losses need a dense region (gt_boxes, all, or main / vlr for dense students)" if space == "features" else "")
            )

    @abstractmethod
    def __call__(self, student: DistillInputs, teacher: DistillInputs, targets: list[Target], space: str) -> Pairs:
        """The pairs of one batch in ``space``."""

    def __str__(self) -> str:
        return self.name
