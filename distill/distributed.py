"""Process-group helpers for ``torchrun`` (DDP); every function is a no-op on one process.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_from_env` joins the group
(gloo on CPU, nccl on CUDA). ``train.batch_size`` is the *global* batch: each of the W ranks gets
``batch_size / W`` images of the same global batch a single process would see, so a run does not
depend on how many processes share it.

Loss normalisers (positives, weight sums, matched GTs) are all-reduced by :func:`mean_over_ranks`:
with ``loss_r = local_sum_r / mean_r(local_norm_r)``, DDP's gradient average
``(1/W) sum_r loss_r = sum_r local_sum_r / sum_r local_norm_r`` is the single-process loss.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from distill.errors import ConfigError
from distill.ops.precision import compute_dtype


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the only rank that writes run files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: torch.device) -> bool:
    """Join the torchrun process group (once); returns True when distributed."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    # Every rank's connections complete before any rank goes on: otherwise a rank that refuses at
    # once (an output folder holding a run) tears the group down while a slower rank is still
    # connecting, and that rank dies in gloo's connectFullMesh with torch's own error instead of
    # reaching the same refusal (seen on a loaded 2-core machine).
    dist.barrier()
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_over_ranks(normaliser: Tensor | float) -> Tensor | float:
    """The mean of a (detached) normaliser over ranks; returned unchanged on one process.

    Must be called by every rank at the same point (it is a collective).
    """
    if not is_distributed():
        return normaliser
    value = torch.as_tensor(normaliser, dtype=compute_dtype()).detach().clone()
    device = value.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        value = value.cuda()
    dist.all_reduce(value)
    return (value / dist.get_world_size()).to(device)


def mean_of_values(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean over ranks of a list of floats (logged loss terms)."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of parameters outside the DDP wrapper (adapters)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must join every all_reduce
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def local_batch_size(global_batch: int) -> int:
    """``train.batch_size`` split over ranks; refused when it does not divide."""
    world = world_size()
    if global_batch % world:
        raise ConfigError(f"train.batch_size {global_batch} is the global batch and must be divisible by the {world} processes")
    return global_batch // world


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
