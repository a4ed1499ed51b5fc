"""Fail early, in one sentence, when torchvision's compiled ops do not load.

The usual cause is a CPU-only torch wheel installed next to a torchvision built for another torch:
``import torchvision`` then works but the first ``nms`` call dies deep inside training with
``operator torchvision::nms does not exist``.
"""
from __future__ import annotations

import torch

FIX = (
    "reinstall the pinned pair: pip install -c constraints.txt --force-reinstall torch torchvision "
    "(see README, 'Install')"
)


class BrokenInstallError(ImportError):
    pass


def check_torchvision_ops() -> None:
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception as exc:  # any failure here means the install is unusable
        torch_version = torch.__version__
        try:
            import torchvision

            tv_version = torchvision.__version__
        except Exception:
            tv_version = "not importable"
        raise BrokenInstallError(
            f"detkd needs torchvision's compiled ops, which fail to load with torch {torch_version} "
            f"and torchvision {tv_version} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"{FIX}."
        ) from exc
