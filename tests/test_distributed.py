"""torchrun DDP on CPU (gloo): two processes with the same global batch train like one process.

Tolerance: per-step losses within 1e-5 relative, final weights within 1e-4 absolute (the only
difference is the order of fp32 sums: gradients all-reduced over two halves of the batch).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.data.loader import EpochSampler
from distill import distributed as dist

TINY = [
    "--set", "data.image_size=64", "--set", "train.batch_size=4", "--set", "student.params.norm_eval=true",
    "--set", "train.threads=1", "--set", "train.warmup_steps=0", "--set", "train.lr=0.01", "--epochs", "2", "--no-progress",
]
# BatchNorm batch statistics are per process under DDP (as in any DDP run without SyncBatchNorm),
# so the equivalence is stated for frozen BN statistics (norm_eval), the setting of pretrained backbones.


def detkd(*args, procs: int = 1, cwd=None):
    launcher = [sys.executable, "-m", "distill"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "distill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    detkd("data", "scenes", root / "data", "--train", 16, "--val", 4, "--size", 64, "--seed", 3)
    detkd("train", "gfl-tiny", "--data", root / "data", "--out", root / "one", "--set", "student.params.fpn_channels=8", *TINY)
    return root


def step_losses(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def assert_same_run(one, two, weight_atol: float = 5e-4):
    # weights: gloo sums gradients in another order than one process; AdamW's division by the root of
    # small second moments turns that rounding into up to ~1.2e-4 on a few elements after 8 steps
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(8))  # 16 images / global batch 4, 2 epochs
    for step in a:
        for key in a[step]:
            if key.startswith("loss"):
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    wa, wb = load_file(str(one / "checkpoints/last.safetensors")), load_file(str(two / "checkpoints/last.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=weight_atol, rtol=0)
    # one set of files: rank 1 wrote nothing of its own
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert files(one) == files(two)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_two_gloo_processes_train_like_one(setup):
    two = setup / "two"
    detkd("train", "gfl-tiny", "--data", setup / "data", "--out", two, "--set", "student.params.fpn_channels=8", *TINY, procs=2)
    assert_same_run(setup / "one", two)


def test_two_gloo_processes_distill_like_one(setup):
    # ld-tiny: student 16-ch vs the 8-ch teacher, so the feature loss trains an adapter outside DDP
    args = ["distill", "ld-tiny", "--teacher", setup / "one", "--data", setup / "data", "--force", *TINY]
    detkd(*args, "--out", setup / "d1")
    detkd(*args, "--out", setup / "d2", procs=2)
    assert_same_run(setup / "d1", setup / "d2")
    sa, sb = load_file(str(setup / "d1/train_state.safetensors")), load_file(str(setup / "d2/train_state.safetensors"))
    adapters = [k for k in sa if k.startswith("extra.")]
    assert adapters
    for key in adapters:
        torch.testing.assert_close(sb[key], sa[key], atol=1e-4, rtol=0)


def test_sampler_shards_each_global_batch_between_ranks():
    whole = list(EpochSampler(10, shuffle=True, seed=1))
    shards = [list(EpochSampler(10, shuffle=True, seed=1, rank=r, world=2, block=4)) for r in range(2)]
    assert shards[0] == whole[0:2] + whole[4:6] and shards[1] == whole[2:4] + whole[6:8]
    assert len(EpochSampler(10, True, 1, rank=1, world=2, block=4)) == 4


def test_single_process_helpers_are_no_ops():
    value = torch.tensor(3.0)
    assert dist.mean_over_ranks(value) is value
    assert dist.world_size() == 1 and dist.is_main() and dist.local_batch_size(5) == 5
    dist.barrier()


def test_two_processes_build_the_same_cache_bytes(setup):
    """Shards dealt to the ranks; rank 0 writes the manifest. Same thread count, so the same bytes."""
    args = ["cache", setup / "one", "--data", setup / "data", "--recipe", "ld-tiny", "--set", "data.image_size=64", "--shard-size", 3, "--no-progress"]
    detkd(*args, "--out", setup / "c1")
    detkd(*args, "--out", setup / "c2", procs=2)
    names = sorted(p.name for p in (setup / "c1").iterdir())
    assert names == sorted(p.name for p in (setup / "c2").iterdir()) and len([n for n in names if n.startswith("shard-")]) == 6
    for name in names:
        if name.startswith("shard-"):
            assert (setup / "c1" / name).read_bytes() == (setup / "c2" / name).read_bytes(), name
    m1, m2 = (json.loads((setup / c / "manifest.json").read_text()) for c in ("c1", "c2"))
    assert m1["shards"] == m2["shards"] and m2["complete"]
    # ... and distilling from it under DDP reads each rank's rows: the same run as one process
    args = ["distill", "ld-tiny", "--teacher", setup / "one", "--data", setup / "data", "--force", "--cache", setup / "c1", *TINY]
    detkd(*args, "--out", setup / "dc1")
    detkd(*args, "--out", setup / "dc2", procs=2)
    a, b = step_losses(setup / "dc1"), step_losses(setup / "dc2")
    assert sorted(a) == sorted(b) == list(range(8))
    # Looser than above (measured: 1e-6 for 4 steps, then 2e-4): fp16 teacher rows and region masks
    # thresholded on the student's own boxes (VLR DIoU, ATSS) turn 1e-7 differences into a flipped row.
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-3)


def test_two_gloo_processes_distill_a_sparse_student_like_one(setup):
    """The sparse path under DDP: ASAG-S from the 6-stage teacher with GT-bridged, teacher-set and
    shared-query terms (Hungarian matching per image, num_boxes all-reduced, the extra decoder pass)."""
    sparse = ["--set", "student.params.norm_eval=true", "--set", "train.threads=1", "--set", "train.warmup_steps=0", "--no-progress"]
    small = ["--set", "data.image_size=64", "--set", "train.batch_size=4", "--epochs", "2"]
    teacher = setup / "sparse6"
    if not (teacher / "summary.json").is_file():
        detkd("train", "sparse6-tiny", "--data", setup / "data", "--out", teacher, *small[:-1], "1", *sparse)
    args = ["distill", "asag-kd-tiny", "--teacher", teacher, "--data", setup / "data", "--force", *small, *sparse]
    detkd(*args, "--out", setup / "s1")
    detkd(*args, "--out", setup / "s2", procs=2)
    # Per-step losses within 1e-5 as above; weights within 5e-4 (measured: 1 of 131k elements at
    # 1.2e-4, the rest below 1e-4 — AdamW's normalised update magnifies a near-zero gradient's rounding).
    assert_same_run(setup / "s1", setup / "s2", weight_atol=5e-4)
