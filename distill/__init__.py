"""detkd: knowledge distillation for object detectors.

The engine (data, ops, training, CLI) lives here; detector architectures in ``students``; frozen
teachers in ``teachers``; ready configurations in ``recipes``.
"""
from distill._compat import check_torchvision_ops

check_torchvision_ops()

__version__ = "0.1.0"
