"""ONNX export of a trained student: its inference path and postprocess in one graph.

``wrappers``: the exported module of each family (images -> padded detections, optionally the raw head
outputs); ``graph_ops``: the traceable pieces they share (a clamped top-k, class- and image-aware NMS
to padded rows); ``onnx_file``: tracing, checks, the atomic write and the onnxruntime session.
"""
from distill.export.onnx_file import DEFAULT_OPSET, export_onnx, load_session, run_session
from distill.export.wrappers import export_module

__all__ = ["DEFAULT_OPSET", "export_module", "export_onnx", "load_session", "run_session"]
