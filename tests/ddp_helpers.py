"""What the torchrun tests share: the launcher, the tiny settings and the same-run assertion.

DDP on CPU (gloo): two processes with the same global batch train like one process.

The only legitimate difference between the two is the order of float sums (each rank reduces half
of the batch, then gloo adds the halves). The proof runs where that rounding cannot hide a bug:
**fp64 reference runs** (``DETKD_DTYPE=float64``, models, batches, losses and AdamW state in fp64).

Tolerances, derived:

* Losses, ``FP64_LOSS_REL = 1e-9``: a sum of n terms is off by ~log2(n)·u relative to the sum of
  |terms| (u = 2^-53 ≈ 1.1e-16); a step's loss chains a ~20-layer network and reductions over
  ≤ 1e4 locations, ≈ 200 roundings: 2e-14 (measured: 2e-16 to 2e-13). 1e-9 leaves 5e4x.
* Weights, ``FP64_WEIGHT_ATOL``: AdamW's update lr·m/(sqrt(v)+eps) magnifies a rounding difference
  δ of a gradient that cancels to ~0 by up to 1/eps (eps = 1e-8). With per-element gradient terms
  of at most unit size, δ ≤ 200·u ≈ 2e-14, so one step moves a weight by at most lr·δ/eps =
  0.01·2e-6 = 2e-8 (lr ≤ 0.01 in every run here), and 8 steps by 1.6e-7 (measured: 2e-14 to
  6e-13).
* The same argument in fp32 (u = 6e-8) bounds nothing useful: δ/eps ≈ 1, i.e. a whole step lr·1
  on a few near-zero-gradient elements (seen: 1.5e-3 on one CPU, 1.2e-4 on another). So the fp32
  runs (``test_distributed.py::test_two_processes_build_the_same_cache_bytes``) are checked on what fp32 does
  guarantee: step 0, before any update, within ``FP32_STEP0_REL``, and the loss curve loosely.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

FP64_LOSS_REL = 1e-9
FP64_WEIGHT_ATOL = 8 * 0.01 * (200 * 2.0**-53) / 1e-8  # steps · lr · (roundings · u) / AdamW eps ≈ 1.8e-7
# step 0 in fp32: same weights, only the summation order differs: ~200 roundings · 2^-24 ≈ 1.2e-5
FP32_STEP0_REL = 200 * 2.0**-24
REFERENCE = {"DETKD_DTYPE": "float64"}

TINY = [
    "--set", "data.image_size=64", "--set", "train.batch_size=4", "--set", "student.params.norm_eval=true",
    "--set", "train.threads=1", "--set", "train.warmup_steps=0", "--set", "train.lr=0.01", "--epochs", "2", "--no-progress",
]
# BatchNorm batch statistics are per process under DDP (as in any DDP run without SyncBatchNorm),
# so the equivalence is stated for frozen BN statistics (norm_eval), the setting of pretrained backbones.


# A guard against a hung process group, not a speed target: a torchrun pair takes ~35-50 s alone on 2
# cores and past 300 s when the suite's other worker and two benchmarks share those cores.
HANG_GUARD_S = 1200


def detkd(*args, procs: int = 1, cwd=None, env: dict[str, str] | None = None):
    launcher = [sys.executable, "-m", "distill"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "distill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def step_losses(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def assert_same_run(one, two):
    """Two fp64 reference runs: every loss term at every step, and every weight (see the module docstring)."""
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(8))  # 16 images / global batch 4, 2 epochs
    for step in a:
        terms = [key for key in a[step] if key.startswith("loss")]
        assert len(terms) > 1, terms  # the total and its terms
        for key in terms:
            assert b[step][key] == pytest.approx(a[step][key], rel=FP64_LOSS_REL, abs=1e-14), (step, key)
    wa, wb = load_file(str(one / "checkpoints/last.safetensors")), load_file(str(two / "checkpoints/last.safetensors"))
    assert wa.keys() == wb.keys()
    assert {v.dtype for v in wa.values() if v.is_floating_point()} == {torch.float64}  # a reference run indeed
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=FP64_WEIGHT_ATOL, rtol=0)
    # one set of files: rank 1 wrote nothing of its own
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))  # noqa: E731
    assert files(one) == files(two)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
