"""Sparse (query-based) detectors: ASAG-S / ASAG-A students and a multi-stage sparse teacher (issue #9).

Registered: ``asag_s`` (learned anchors), ``asag_s_gen`` (the ASAG generator), ``asag_a`` (AdaMixer-lite),
``sparse_rcnn6`` (6 stacked stages).

Modules: ``box_ops`` (codings), ``matcher`` (Hungarian), ``criterion`` (focal / Query Weighting,
L1, GIoU, DFL), ``layers``, ``proposal`` (query sources + proposal block), ``decoder`` (one
dynamic stage), ``adamixer`` (AdaMixer-lite stage), ``postprocess``, ``model`` (``SparseDetector`` and its registry entries).

Plugging in an anchor source (the ASAG generator)::

    @register_query_source("asag")
    def asag_generator(num_queries, dim, groups, strides, **params) -> nn.Module: ...
        # forward(features, image_sizes, targets=None) -> Queries(boxes (B, Q, 4) px xyxy, valid (B, Q), ...)
        # loss(queries, targets, image_sizes) -> {"loss_...": weighted term}   (optional)

    create_student("asag_s", query_source="asag", query_source_params={...})
"""
from students.asag import adamixer, box_ops, criterion, decoder, layers, matcher, postprocess, proposal  # noqa: F401
from students.asag import generator_source  # noqa: F401  (registers the query source "asag")
from students.asag.model import SparseDetector, SparsePredictions  # registers asag_s, asag_s_gen, asag_a, sparse_rcnn6
from students.asag.proposal import LearnedAnchors, ProposalBlock, Queries, QuerySource, create_query_source, register_query_source

__all__ = [
    "SparseDetector", "SparsePredictions", "LearnedAnchors", "ProposalBlock", "Queries", "QuerySource",
    "create_query_source", "register_query_source",
]
