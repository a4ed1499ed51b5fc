"""The Adaptive Sparse Anchor Generator as the sparse detector's query source ``"asag"``.

``GeneratorSource`` adapts :class:`~students.sparse.asag.anchor_generator.AnchorGenerator` to the
:class:`~students.sparse.queries.QuerySource` base class: it hands the generator the P3-P5 maps of the
detector's FPN, returns its padded anchors as :class:`Queries` (the raw :class:`AnchorOutput` rides in
``extras["anchors"]``) and adds the generator's own losses (``loss_anchor_*``) to the detector's.

Training behaviour follows the generator's rule: its training windows (GT / random probe patches,
P6 flips) run when targets reach ``head(features, image_sizes, targets)`` — the engine's training
steps pass them (``distill.engine.forward.StudentForward``); a caller that gives none gets the
inference path, and the patch losses of that path.
"""
from __future__ import annotations

import inspect

from torch import Tensor

from distill.errors import ConfigError
from distill.structures import Target
from students.sparse.asag.anchor_generator import STRIDES as GENERATOR_STRIDES
from students.sparse.asag.anchor_generator import AnchorGenerator
from students.sparse.queries import Queries, QuerySource, register_query_source

__all__ = ["GeneratorSource"]


class GeneratorSource(QuerySource):
    """``forward(features, image_sizes, targets=None) -> Queries``; ``loss(queries, targets, image_sizes)``.

    features: the detector's FPN maps at ``strides``; the generator reads those at strides 8, 16, 32.
    """

    def __init__(self, generator: AnchorGenerator, strides: tuple[int, ...]) -> None:
        super().__init__()
        missing = [s for s in GENERATOR_STRIDES if s not in strides]
        if missing:
            raise ConfigError(f"query source 'asag' needs FPN strides 8, 16 and 32; the detector has {tuple(strides)}")
        self.generator = generator
        self.levels = [list(strides).index(s) for s in GENERATOR_STRIDES]

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None) -> Queries:
        out = self.generator([features[i] for i in self.levels], image_sizes, targets if self.training else None)
        return Queries(out.boxes, out.valid, extras={"anchors": out})

    def loss(self, queries: Queries, targets: list[Target], image_sizes: Tensor) -> dict[str, Tensor]:
        losses = self.generator.loss(queries.extras["anchors"], [t.to(image_sizes.device) for t in targets], image_sizes)
        # A level the batch did not probe (early stop) leaves its compression branch out of the graph;
        # a zero term keeps every generator parameter in it (DDP's unused-parameter check).
        first = next(iter(losses))
        losses[first] = losses[first] + sum(p.sum() for p in self.generator.parameters()) * 0
        return losses


@register_query_source("asag")
def _asag(num_queries: int, dim: int, groups: int, strides: tuple[int, ...], **params) -> GeneratorSource:
    """``params``: AnchorGenerator keyword arguments (``compress_dim``, ``anchors_fixed``, ``max_anchors``, ...)."""
    if groups != 1:
        raise ConfigError("query source 'asag' gives image-specific anchors: groups must be 1")
    try:
        generator = AnchorGenerator(dim, **params)
    except TypeError as exc:
        raise ConfigError(f"query source 'asag': {exc}") from exc
    return GeneratorSource(generator, tuple(strides))


def _check_generator(params: dict, detector: dict) -> list:
    """The generator's own constraints, at recipe load (``AnchorGenerator`` refuses the same at build)."""
    from students.registry import ParamCheck

    grid = params.get("fixed_grid", 8)
    levels = params.get("probe_levels", 2)
    fixed, low, high = params.get("anchors_fixed", 10), params.get("min_anchors", 5), params.get("max_anchors", 60)
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (grid, levels, fixed, low, high))
    return [
        ParamCheck("query_source_params", params, ints, "integers for fixed_grid, probe_levels, anchors_fixed, min_anchors, max_anchors"),
        ParamCheck("query_source_params", params, not ints or (grid >= 2 and grid % 2 == 0), f"an even fixed_grid >= 2 (got {grid})"),
        ParamCheck("query_source_params", params, not ints or levels in (0, 1, 2), f"probe_levels 0, 1 or 2 (got {levels})"),
        ParamCheck("query_source_params", params, not ints or 0 <= low <= min(high, 5 * fixed),
                   f"0 <= min_anchors <= min(max_anchors, 5 * anchors_fixed) (got {low}, {high}, {fixed})"),
        ParamCheck("groups", detector.get("groups"), detector.get("groups") == 1, "1 with query_source 'asag' (image-specific anchors)"),
        ParamCheck("strides", detector.get("strides"), isinstance(detector.get("strides"), (list, tuple)) and all(s in detector["strides"] for s in GENERATOR_STRIDES),
                   "a list holding the strides 8, 16 and 32 with query_source 'asag'"),
    ]


_asag.accepts = tuple(k for k in inspect.signature(AnchorGenerator.__init__).parameters if k not in ("self", "in_channels"))
_asag.check_params = _check_generator
