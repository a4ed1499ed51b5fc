"""Sparse R-CNN (Sun et al., CVPR 2021): dynamic-convolution decoder stages, stacked.

Registered: ``sparse_rcnn6``, the multi-stage sparse teacher (6 stages on the family's proposal
block). The stage (``stage.DynamicStage``) is registered as decoder ``"dynamic"``; ASAG-S uses it as
its single layer.
"""
from students.registry import register_preset
from students.sparse.roi_detector import build_sparse_detector
from students.sparse.sparse_rcnn import stage  # noqa: F401  (registers the stage "dynamic")
from students.sparse.sparse_rcnn.stage import DynamicConv, DynamicStage

__all__ = ["DynamicConv", "DynamicStage"]

register_preset(
    "sparse_rcnn6",
    build_sparse_detector,
    "Multi-stage sparse teacher: 6 stacked dynamic decoder stages, boxes refined and detached per stage, every "
    "stage supervised, focal loss without Query Weighting, box positional term in self-attention.",
    stages=6,
    parallel_heads=1,
    query_weighting=False,
    box_pe=True,
)
