"""ASAG (Fu et al., ICCV 2023): one-decoder-layer sparse students.

Registered: ``asag_s`` (learned anchors), ``asag_s_gen`` (the Adaptive Sparse Anchor Generator as
query source "asag"), ``asag_a`` (AdaMixer-lite decoder, stage "adamixer").

Modules: ``anchor_generator`` + ``generator_*`` (the generator, its ops, types, training targets),
``generator_source`` (the generator as a query source), ``adamixer`` (ASAG-A's decoder stage).
ASAG-S's decoder layer is Sparse R-CNN's (stage "dynamic", ``students.sparse.sparse_rcnn``), picked
by name, so this package imports only the family's shared modules.

Plugging in another anchor source::

    class MySource(QuerySource):
        def forward(self, features, image_sizes, targets=None) -> Queries: ...  # boxes (B, Q, 4) px xyxy, valid (B, Q)
        def loss(self, queries, targets, image_sizes) -> dict: ...  # {"loss_...": weighted term}; default: none

    @register_query_source("mine")
    def my_source(num_queries, dim, groups, strides, **params) -> QuerySource: ...

    create_student("asag_s", query_source="mine", query_source_params={...})
"""
from students.registry import register_preset
from students.sparse.asag import adamixer, generator_source  # noqa: F401  (register the stage "adamixer", the source "asag")
from students.sparse.roi_detector import build_sparse_detector

register_preset(
    "asag_s",
    build_sparse_detector,
    "ASAG-S student: proposal block + one Sparse R-CNN decoder layer, 4 parallel heads in training, Query "
    "Weighting; learned anchors (query_source='asag' plugs in the generator).",
)
register_preset(
    "asag_s_gen",
    build_sparse_detector,
    "ASAG-S fed by the Adaptive Sparse Anchor Generator (query_source 'asag'; P3-P5 FPN, image-specific "
    "anchors padded per batch): proposal block + one dynamic layer, 4 parallel heads in training, Query Weighting.",
    query_source="asag",
    strides=(8, 16, 32),
)
register_preset(
    "asag_a",
    build_sparse_detector,
    "ASAG-A-style student: proposal block + one AdaMixer-lite decoder layer (adaptive sampling and mixing), 4 parallel "
    "heads in training, Query Weighting.",
    decoder="adamixer",
)
