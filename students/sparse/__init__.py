"""The sparse (query-based) detector family, laid out like D-FINE's ``src/zoo/<model>/``.

Shared by every query detector (this package):

- ``box_ops`` (codings), ``matcher`` (Hungarian, the focal cost), ``criterion`` (focal / Query
  Weighting, L1, GIoU, DFL on every head), ``postprocess``, ``heads`` (class / bins heads),
  ``layers`` (FPN, RoIAlign, attention masks and query groups, sine box embedding),
  ``queries`` (query sources, learned anchors), ``config`` (typed option groups, parameter checks),
  ``detector`` (:class:`QueryDetector`: the contract around a decoder), ``stage`` (the RoI stage
  and its registry), ``proposal`` + ``roi_detector`` (the RoI-based detector ASAG and Sparse R-CNN
  build on).

Models, each in its own subpackage, importing only the shared modules:

- ``asag``: the anchor generator, ASAG-A's AdaMixer stage; ``asag_s``, ``asag_s_gen``, ``asag_a``;
- ``sparse_rcnn``: the dynamic-convolution stage; ``sparse_rcnn6``;
- ``dab_detr``: DAB-DETR's decoder (dynamic anchor boxes, modulated cross-attention); ``dab_detr``
  and its presets.
"""
from students.sparse import (
    asag,  # noqa: F401  (asag_s, asag_s_gen, asag_a)
    dab_detr,  # noqa: F401  (dab_detr)
    sparse_rcnn,  # noqa: F401  (stage "dynamic", sparse_rcnn6) -- first: asag_s uses it
)
from students.sparse.detector import QueryDetector, SparsePredictions
from students.sparse.proposal import ProposalBlock
from students.sparse.queries import LearnedAnchors, Queries, QuerySource, create_query_source, register_query_source
from students.sparse.roi_detector import SparseDetector, build_sparse_detector

__all__ = [
    "QueryDetector", "SparseDetector", "SparsePredictions", "build_sparse_detector", "LearnedAnchors", "ProposalBlock",
    "Queries", "QuerySource", "create_query_source", "register_query_source",
]
