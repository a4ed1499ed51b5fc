"""The dense pairer: a region of the location grid, the same location on both sides.

It wraps :mod:`distill.regions` (``main``, ``vlr``, ``gt_boxes``, ``all``): the region mask over
the student's grid becomes pairs ``(image, n, n, mask[image, n])``. For prediction losses both
detectors must be dense and predict on the same grid (same strides; the input size is checked when
the maps meet). For feature losses only the FPN grids must agree, level by level at the same stride
(the teacher may have more levels: a P3-P5 student imitates a P3-P7 teacher's P3-P5), so
``gt_boxes`` and ``all`` also serve a sparse student's FPN maps; ``main`` and ``vlr`` read the
student's dense matches and refuse a sparse student.
"""
from __future__ import annotations

from dataclasses import dataclass

from distill.errors import ConfigError
from distill.inputs import DistillInputs
from distill.pairers.base import Pairer
from distill.regions import Region
from distill.structures import DenseOutputs, DetectorSpec, Pairs, Target

# The LD reference's avg_factor for its Main and VLR terms (HikariTJU/LD configs).
LD_REFERENCE_AVG_FACTOR = {"main": 4.0, "vlr": 16.0}


@dataclass(frozen=True)
class RegionPairer(Pairer):
    region: Region

    spaces = ("predictions", "features")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.region.name

    @property
    def on_student_positives(self) -> bool:  # type: ignore[override]
        return self.region.name == "main"

    @property
    def ld_reference_avg_factor(self) -> float:  # type: ignore[override]
        return LD_REFERENCE_AVG_FACTOR.get(self.region.name, Pairer.ld_reference_avg_factor)

    def check(self, student: DetectorSpec, teacher: DetectorSpec, space: str) -> None:
        super().check(student, teacher, space)
        if space == "predictions":
            for side, spec in (("student", student), ("teacher", teacher)):
                if spec.family != "dense":
                    raise ConfigError(
                        f"pairer {str(self.region)!r} compares the same dense location of student and teacher, but the {side} is a "
                        f"{spec.family} detector; use a matched pairer (gt_bridged, teacher_set)"
                    )
        elif self.region.reads_matches and student.family != "dense":
            raise ConfigError(
                f"pairer {str(self.region)!r} reads the student's dense positives, but the student is a {student.family} detector; "
                "use region gt_boxes or all for its FPN features"
            )
        if space == "predictions" and tuple(student.strides) != tuple(teacher.strides):
            raise ConfigError(
                f"pairer {str(self.region)!r}: teacher strides {tuple(teacher.strides)} != student strides {tuple(student.strides)}; "
                "dense pairs compare the same locations, so both detectors must predict at the same FPN levels"
            )
        if space == "predictions" and student.grid != teacher.grid:
            raise ConfigError(
                f"pairer {str(self.region)!r}: the teacher predicts on the {teacher.grid!r} grid, the student on the {student.grid!r} grid; "
                "dense pairs compare box bins measured from the same location point, so both need the same grid (student.params.grid)"
            )
        missing = sorted(set(student.strides) - set(teacher.strides))
        if space == "features" and missing:
            # Feature losses pair each student level with the teacher level of the same stride, so a
            # P3-P5 student can imitate a P3-P7 teacher; a student level the teacher lacks cannot.
            raise ConfigError(
                f"pairer {str(self.region)!r}: the teacher has no FPN map at student stride(s) {missing} "
                f"(teacher strides {tuple(teacher.strides)}, student {tuple(student.strides)}); "
                "feature pairs compare the same location at the same stride"
            )

    def __call__(self, student: DistillInputs, teacher: DistillInputs | None, targets: list[Target], space: str) -> Pairs:
        if space == "predictions":
            self._check_same_grid(student, teacher)
        points, strides, valid = student.grid(space)
        mask = self.region(points, strides, targets, student.matches, valid)  # (B, N)
        return Pairs.from_mask(mask, space)

    def _check_same_grid(self, student: DistillInputs, teacher: DistillInputs | None) -> None:
        """Same strides are checked at build time; the map sizes (input size, padding) only here."""
        s_grid = student.predictions
        t_grid = None if teacher is None else teacher.predictions  # a teacher cache checks its own canvas
        if isinstance(s_grid, DenseOutputs) and isinstance(t_grid, DenseOutputs) and list(s_grid.level_sizes) != list(t_grid.level_sizes):
            raise ConfigError(
                f"pairer {str(self.region)!r}: student levels {s_grid.level_sizes} != teacher levels {t_grid.level_sizes}; "
                "logit distillation needs the same strides and input size"
            )

    def __str__(self) -> str:
        return str(self.region)
