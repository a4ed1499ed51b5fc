"""Query sources of the sparse detectors (spec §3): what the decoder's first boxes come from.

A *query source* turns FPN maps into the initial boxes of a sparse detector. It is pluggable:

- :class:`LearnedAnchors`: a fixed number of learned boxes (image-normalised, stored pre-sigmoid,
  DAB-DETR style) plus learned content vectors (Sparse R-CNN's proposal features); with
  ``groups = K`` it holds K groups of them and returns all K in training, group 0 at inference.
- the ASAG generator (``students/sparse/asag/anchor_generator.py``) plugs in through the
  same :class:`QuerySource` base class: per-image variable anchors padded to ``(B, Q_max, 4)`` with a
  ``valid`` mask. Sources are registered by name (:func:`register_query_source`), so a detector's
  ``query_source="asag"`` (+ ``query_source_params``) is part of its config and checkpoints rebuild it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.ops.precision import compute_dtype
from distill.structures import Target
from students.sparse.box_ops import cxcywh_to_xyxy

__all__ = ["Queries", "QuerySource", "LearnedAnchors", "register_query_source", "create_query_source", "check_query_source"]


@dataclass
class Queries:
    """Initial queries of a batch.

    boxes:   (B, Q, 4) xyxy input pixels (padding queries: any finite box, e.g. the whole image).
    valid:   (B, Q) bool; False for padding (masked as attention keys, never matched).
    content: (B | 1, Q, D) content vectors added to the RoI content, or None.
    groups:  (Q,) int64 query group of each query (Group DETR), or None for one group.
    extras:  whatever the source's own loss needs (e.g. the generator's anchor score logits);
             ``QuerySource.loss`` reads it back from ``SparsePredictions.queries``.
    """

    boxes: Tensor
    valid: Tensor
    content: Tensor | None = None
    groups: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def to(self, device) -> "Queries":
        move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return replace(self, boxes=move(self.boxes), valid=move(self.valid), content=move(self.content),
                       groups=move(self.groups), extras={k: move(v) for k, v in self.extras.items()})


class QuerySource(nn.Module):
    """Base of the modules a detector gets its initial queries from.

    ``forward(features, image_sizes, targets=None) -> Queries``: ``features`` are the FPN maps,
    ``image_sizes`` (B, 2) (h, w); ``targets`` is passed in training when the caller has them (the
    generator's training patches need GT), None otherwise.
    ``loss(queries, targets, image_sizes) -> dict[str, Tensor]``: the source's own weighted terms,
    which the detector adds to its losses (the generator's anchor losses, spec §2.7); none by default.
    """

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None) -> Queries:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def loss(self, queries: Queries, targets: list[Target], image_sizes: Tensor) -> dict[str, Tensor]:
        return {}


class LearnedAnchors(QuerySource):
    """``num_queries x groups`` learned boxes and content vectors.

    Boxes are stored as logits of image-normalised (cx, cy, w, h), initialised with random centres and
    sides ``init_size`` of the image; they become pixels of each image's (h, w). Training returns every
    group (group ids ``repeat_interleave``), inference the first ``num_queries`` (group 0) only, so the
    inference cost does not depend on ``groups``. ``content=False``: no content vectors (DAB-DETR, whose
    decoder content starts at zero), ``Queries.content`` is then None.
    """

    def __init__(self, num_queries: int, dim: int, groups: int = 1, init_size: float = 0.25, content: bool = True) -> None:
        super().__init__()
        self.num_queries, self.groups = num_queries, groups
        total = num_queries * groups
        centres = torch.rand(total, 2).clamp(0.02, 0.98)
        sizes = torch.full((total, 2), init_size)
        self.box_logits = nn.Parameter(torch.logit(torch.cat([centres, sizes], dim=1)))
        self.content = nn.Parameter(torch.zeros(total, dim)) if content else None

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None) -> Queries:
        count = self.num_queries * (self.groups if self.training else 1)
        batch = features[0].shape[0]
        h, w = image_sizes[:, 0].to(compute_dtype()), image_sizes[:, 1].to(compute_dtype())
        scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]  # (B, 1, 4)
        boxes = cxcywh_to_xyxy(self.box_logits[:count].sigmoid()[None] * scale)  # (B, Q, 4)
        valid = torch.ones(batch, count, dtype=torch.bool, device=boxes.device)
        groups = None
        if self.training and self.groups > 1:
            groups = torch.arange(self.groups, device=boxes.device).repeat_interleave(self.num_queries)
        content = None if self.content is None else self.content[:count][None]
        return Queries(boxes, valid, content, groups)


# ------------------------------------------------------------------------------ source registry
QuerySourceFactory = Callable[..., QuerySource]
_SOURCES: dict[str, QuerySourceFactory] = {}


def register_query_source(name: str) -> Callable[[QuerySourceFactory], QuerySourceFactory]:
    """Register a query-source factory under ``name`` (the detector's ``query_source`` parameter).

    The factory is called as ``factory(num_queries=..., dim=..., groups=..., strides=..., **query_source_params)``
    and returns a :class:`QuerySource`; it may ignore what it does not use.
    """

    def wrap(fn: QuerySourceFactory) -> QuerySourceFactory:
        if name in _SOURCES and _SOURCES[name] is not fn:
            raise ValueError(f"query source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return wrap


def query_source_checks(p: dict) -> list:
    """``query_source`` is registered; ``query_source_params`` are keyword arguments its factory takes
    (a factory with ``**params`` may name them in ``accepts``, a tuple), checked by its ``check_params``
    (``(params, detector params) -> list[ParamCheck]``) when it has one. ``ParamCheck`` rows."""
    import inspect

    from students.registry import ParamCheck

    name, params = p.get("query_source"), p.get("query_source_params") or {}
    if name not in _SOURCES:
        return [ParamCheck("query_source", name, False, f"one of {', '.join(map(repr, sorted(_SOURCES)))}")]
    factory = _SOURCES[name]
    fixed = {"num_queries", "dim", "groups", "strides"}
    named = getattr(factory, "accepts", None) or [k for k in inspect.signature(factory).parameters if k not in fixed and k != "params"]
    unknown = sorted(set(params) - set(named))
    rows = [ParamCheck("query_source_params", params, not unknown, f"keyword arguments of query source {name!r} ({', '.join(named)}); "
                       f"unknown: {', '.join(unknown)}")]
    check = getattr(factory, "check_params", None)
    if not unknown and check is not None:
        rows += check(params, p)
    return rows


def create_query_source(name: str, num_queries: int, dim: int, groups: int, strides: tuple[int, ...], params: dict | None = None) -> QuerySource:
    """Build the registered source ``name``; ``ConfigError`` naming the known sources otherwise."""
    if name not in _SOURCES:
        raise ConfigError(f"unknown query source {name!r}; known: {', '.join(sorted(_SOURCES))}")
    return check_query_source(_SOURCES[name](num_queries=num_queries, dim=dim, groups=groups, strides=strides, **(params or {})), repr(name))


def check_query_source(source: QuerySource, what: str) -> QuerySource:
    """``source`` itself when it is a :class:`QuerySource` (its ``loss`` is then declared), else TypeError."""
    if not isinstance(source, QuerySource):
        raise TypeError(f"query source {what} is a {type(source).__name__}, not a students.sparse.queries.QuerySource subclass")
    return source


@register_query_source("learned")
def _learned(num_queries: int, dim: int, groups: int, strides: tuple[int, ...], init_size: float = 0.25) -> LearnedAnchors:
    return LearnedAnchors(num_queries, dim, groups, init_size)
