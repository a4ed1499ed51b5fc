"""What one entry of a teacher cache holds: the layout interface, and its registry.

A teacher cache is one shard store (``teachers.cache_format``: manifest, fingerprint, atomic
shards; ``teachers.cache_build`` writes it, DDP round-robin; ``teachers.cache`` reads it). An entry
(one image variant) is a slice of two row parts in a shard; what those rows are belongs to the
layout named by the manifest's ``layout["kind"]``:

- ``dense`` (:class:`teachers.cache_dense.DenseLayout`): a dense teacher's class / bin logits and
  FPN feature vectors at the locations of the recipe's regions;
- ``queries`` (:class:`teachers.cache_queries.QueryLayout`): every query row of a sparse teacher
  and its Hungarian matches of the image's ground truth.

The store never branches on the kind: it asks the layout to probe the teacher, compute a batch's
rows, count them, serve a batch at train time and check a run's losses.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from distill.inputs import DistillInputs
from distill.structures import Batch, DetectorSpec

LAYOUTS: dict[str, type["CacheLayout"]] = {}


def register_layout(cls: type["CacheLayout"]) -> type["CacheLayout"]:
    """Class decorator: the layout a manifest's ``layout["kind"]`` names."""
    if cls.kind in LAYOUTS:
        raise ValueError(f"cache layout {cls.kind!r} registered twice")
    LAYOUTS[cls.kind] = cls
    return cls


def layout_from_manifest(layout: dict[str, Any]) -> "CacheLayout":
    """The layout of a manifest's ``layout`` record (caches from before layouts had kinds are dense)."""
    kind = layout.get("kind", "dense")
    if kind not in LAYOUTS:
        raise ValueError(f"unknown teacher cache layout {kind!r} (known: {', '.join(LAYOUTS)})")
    return LAYOUTS[kind](layout)


class CacheLayout(ABC):
    """The rows of one image variant: how a build computes and stores them, how a run reads them.

    ``record``: the manifest's ``layout`` entry (canvas, and what the kind needs: level sizes,
    classes, bins, channels). ``parts``: the two row parts of an entry, in the order of the shard's
    ``entries`` table (image id, variant, start and count of part 1, start and count of part 2), each
    with its tensor names; the first name of a part counts its rows.
    """

    kind: ClassVar[str]
    family: ClassVar[str]  # the teacher family cached this way (DetectorSpec.family)
    parts: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]]

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.canvas = tuple(record["canvas"])

    # ------------------------------------------------------------------------------- build
    @classmethod
    @abstractmethod
    def probe(cls, teacher, canvas: tuple[int, int], spec) -> "CacheLayout":
        """The layout of ``teacher`` (FrozenTeacher) on ``canvas`` for ``spec`` (CacheSpec), from one blank image."""

    @abstractmethod
    def batch_rows(self, teacher, matcher, batch: Batch, spec) -> list[dict[str, Tensor]]:
        """Run the teacher on a canvas-padded batch; per image its rows (CPU tensors named as in ``parts``)."""

    @abstractmethod
    def stored_rows(self, rows: list[dict[str, Tensor]]) -> tuple[int, int]:
        """(head rows, feature rows) of a shard's entries, for the manifest and the summary."""

    def dense_bytes_per_entry(self) -> int:
        """fp16 bytes of the teacher's dense maps of one entry for the stored parts (0: no dense maps)."""
        return 0

    def shard_tensors(self, keys: list[tuple[int, int]], rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The tensors of one shard: the ``entries`` table and each part's rows concatenated.

        keys: (image id, variant code) of each entry; rows: its tensors (a part absent from the
        first entry is absent from the shard).
        """
        table, starts = [], [0 for _ in self.parts]
        for (image_id, code), entry in zip(keys, rows):
            line = [image_id, code]
            for i, (_, names) in enumerate(self.parts):
                count = len(entry[names[0]]) if names[0] in entry else 0
                line += [starts[i], count]
                starts[i] += count
            table.append(line)
        tensors = {"entries": torch.tensor(table, dtype=torch.int64).reshape(-1, 2 + 2 * len(self.parts))}
        for _, names in self.parts:
            for name in names:
                if rows and name in rows[0]:
                    tensors[name] = torch.cat([entry[name] for entry in rows]).contiguous()
        return tensors

    # -------------------------------------------------------------------------------- read
    @abstractmethod
    def detector_spec(self, fingerprint: dict[str, Any]) -> DetectorSpec:
        """The cached teacher as pair checks see it (classes already mapped to the student's)."""

    @abstractmethod
    def request(self, fingerprint: dict[str, Any], size_divisor: int):
        """The CacheSpec a run's fingerprint is computed with, to compare with the cache's."""

    @abstractmethod
    def check_losses(self, cache, losses) -> None:
        """Refuse (CheckpointError, one line naming ``cache.folder``) a loss this layout cannot serve."""

    @abstractmethod
    def inputs(self, cache, batch: Batch, student: DistillInputs, needs: frozenset[str], entries: list[dict[str, Tensor]]) -> DistillInputs:
        """The teacher side of ``batch`` from its entries' rows (``cache.rows`` of each image variant)."""
