"""Pairers: which student row a distillation loss compares with which teacher row.

Registry (names used by recipes as a loss's ``pairer``):

- dense regions (:mod:`distill.pairers.dense`): ``main``, ``vlr``, ``gt_boxes``, ``all`` — the same
  location on both sides;
- matched (:mod:`distill.pairers.matched`): ``gt_bridged`` (through each GT's student and teacher
  match), ``teacher_set`` (Hungarian matching of student predictions to the teacher's set);
- shared (:mod:`distill.pairers.shared`): ``shared_queries`` — the teacher's boxes run through the
  student's decoder as an isolated query group (KD-DETR), query k <-> teacher prediction k;
- crossed (:mod:`distill.pairers.crossed`): ``crossed_queries`` — the student's query state entering
  its last decoder layer <-> the teacher's decoder from the same boxes (``crosskd_query`` only).

``create_pairer(name, **params)`` validates names and options (ConfigError naming them).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from distill.errors import ConfigError
from distill.pairers.base import SPACES, Pairer
from distill.pairers.crossed import CrossedQueriesPairer
from distill.pairers.dense import RegionPairer
from distill.pairers.matched import GTBridgedPairer, TeacherSetPairer, representative_matches, set_matching_cost
from distill.pairers.shared import SharedQueriesPairer
from distill.regions import create_region, list_regions

MATCHED: dict[str, type[Pairer]] = {
    "gt_bridged": GTBridgedPairer, "teacher_set": TeacherSetPairer, "shared_queries": SharedQueriesPairer, "crossed_queries": CrossedQueriesPairer,
}


def list_pairers() -> list[str]:
    return sorted([*list_regions(), *MATCHED])


def create_pairer(name: str, **params: Any) -> Pairer:
    """A registered pairer with bound options; unknown names, options or values raise ConfigError."""
    if name in MATCHED:
        cls = MATCHED[name]
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"pairer {name!r} has no option {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted) if accepted else 'none'}"
            )
        return cls(**params)
    if not isinstance(name, str) or name not in list_regions():
        raise ConfigError(f"unknown pairer {name!r}; available: {', '.join(list_pairers())}")
    return RegionPairer(create_region(name, **params))


__all__ = [
    "SPACES", "Pairer", "RegionPairer", "GTBridgedPairer", "TeacherSetPairer", "SharedQueriesPairer", "CrossedQueriesPairer", "create_pairer",
    "list_pairers",
    "representative_matches", "set_matching_cost",
]
