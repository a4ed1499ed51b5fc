"""RefineBox: a box refiner trained on a frozen detector (``detkd refine``), and refined detectors.

- ``refiner``: the module (its own light FPN, RoIAlign, GN bottlenecks, shared-weight steps);
- ``criterion``: L1 x 5 + GIoU x 2 per step;
- ``model``: :class:`RefinedDetector`, the frozen detector + refiner speaking the detector contract;
- ``saved``: the refined run on disk (refiner weights, the detector referenced by path and sha256).

The training run is ``distill.engine.refine`` (the project's Trainer; teachers never import the engine).
"""
from teachers.refine.model import RefinedDetector
from teachers.refine.refiner import BoxRefiner

__all__ = ["RefinedDetector", "BoxRefiner"]
