"""Where a run computes (``--device``) and in which precision (``--amp``, ``DETKD_DTYPE``).

``auto`` is CUDA when available, else the CPU; under torchrun every rank uses ``cuda:LOCAL_RANK``.
Mixed precision autocasts the student's forward and loss (the distillation kernels cast to fp32
themselves); fp16 needs a GradScaler and CUDA, bf16 runs on either.

``DETKD_DTYPE=float64`` makes a *reference run*: the run's models, batches, losses and optimizer
state are fp64 (the default dtype is fp64 while the run lasts). It is ~2-4x slower and meant for
proofs, not training: two computations that are the same math agree there to ~1e-12 rather than
fp32's ~1e-6, so a test can tell a rounding difference from a bug (``tests/test_distributed.py``).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from distill.errors import ConfigError

AMP_MODES = ("off", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Runtime:
    """Device and precision of a run; not part of the recipe (a resumed run may move machines)."""

    device: str = "cpu"
    amp: str = "off"
    dtype: str = "float32"  # the default float dtype while the run lasts (float64: a reference run)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @contextlib.contextmanager
    def precision(self):
        """The run's default float dtype for the duration of the block (restored after)."""
        before = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[self.dtype])
        try:
            yield
        finally:
            torch.set_default_dtype(before)


def resolve_device(text: str | None, option: str = "--device") -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a torch device; refused with one line when unusable."""
    text = (text or "auto").strip().lower()
    if not _DEVICE.fullmatch(text):
        raise ConfigError(f"{option} {text!r}: expected auto, cpu, cuda or cuda:N")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {text}: CUDA is not available on this machine (use --device cpu)")
        if text == "cuda" and "LOCAL_RANK" in os.environ:
            text = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun rank
        index = torch.device(text).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(text)


def make_runtime(device: str | None = None, amp: str | None = None, dtype: str | None = None) -> Runtime:
    """``dtype`` None reads ``DETKD_DTYPE`` (float32 when unset)."""
    amp = (amp or "off").strip().lower()
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    dtype = (dtype or os.environ.get("DETKD_DTYPE") or "float32").strip().lower()
    if dtype not in DTYPES:
        raise ConfigError(f"DETKD_DTYPE {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "float32" and amp != "off":
        raise ConfigError(f"--amp {amp} with DETKD_DTYPE={dtype}: a reference run is fp64 throughout; use --amp off")
    resolved = resolve_device(device)
    if amp == "fp16" and resolved.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (its GradScaler guards fp16 gradients); use --amp bf16 on the CPU")
    return Runtime(device=str(resolved), amp=amp, dtype=dtype)


def autocast(runtime: Runtime):
    """The autocast context of ``runtime`` (a null context when AMP is off)."""
    if runtime.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.amp == "bf16" else torch.float16
    return torch.autocast(device_type=runtime.torch_device.type, dtype=dtype)


def grad_scaler(runtime: Runtime):
    """A GradScaler for fp16, else None."""
    if runtime.amp != "fp16":
        return None
    return torch.amp.GradScaler(runtime.torch_device.type)


def auto_workers(requested: int | None, device: torch.device, world: int = 1) -> int:
    """DataLoader workers: the recipe's ``train.num_workers`` when set, else a default for the device.

    CPU: 0 — the cores are the ones training, and non-persistent workers (rebuilt every epoch so they
    see the epoch's flips) cost more than decoding small images in the main process. CUDA: enough
    decoding processes to keep the GPU fed, the machine's cores shared between the ranks, at most 4.
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // max(world, 1)))
