"""detkd: knowledge distillation for object detectors.

The engine (data, ops, training, CLI) lives here; detector architectures in ``students``; frozen
teachers in ``teachers``; ready configurations in ``recipes``.

Public API (imported lazily, so ``import distill`` stays light)::

    distill.Distiller, distill.create_loss, distill.list_losses, distill.create_region,
    distill.list_regions, distill.train_run, distill.distill_run, distill.evaluate_detector
"""
from distill._compat import check_torchvision_ops

check_torchvision_ops()

__version__ = "0.1.0"

_LAZY = {
    "Distiller": "distill.engine.distiller",
    "create_loss": "distill.losses",
    "list_losses": "distill.losses",
    "create_region": "distill.regions",
    "list_regions": "distill.regions",
    "train_run": "distill.engine.run",
    "distill_run": "distill.engine.run",
    "evaluate_detector": "distill.engine.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
