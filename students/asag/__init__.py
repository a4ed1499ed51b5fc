"""Sparse (query-based) detectors: ASAG-S student and a multi-stage sparse teacher (issue #9).

Modules: ``box_ops`` (codings), ``matcher`` (Hungarian), ``criterion`` (focal / Query Weighting,
L1, GIoU, DFL), ``layers``, ``proposal`` (query sources + proposal block), ``decoder`` (one
dynamic stage), ``adamixer`` (AdaMixer-lite stage), ``postprocess``, ``model`` (``SparseDetector`` and its registry entries).
"""
from students.asag import adamixer, box_ops, criterion, decoder, layers, matcher, postprocess, proposal  # noqa: F401
from students.asag.model import SparseDetector, SparsePredictions  # registers asag_s, asag_a, sparse_rcnn6
from students.asag.proposal import LearnedAnchors, ProposalBlock, Queries, QuerySource

__all__ = ["SparseDetector", "SparsePredictions", "LearnedAnchors", "ProposalBlock", "Queries", "QuerySource"]
