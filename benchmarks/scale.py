"""Throughput of ``detkd train`` and ``detkd distill`` on 1 and N processes (torchrun), CPU or GPU.

Each configuration is a real CLI run (plain ``python -m distill`` for one process, ``torchrun
--nproc-per-node N -m distill`` for N) on the same generated scenes with the same *global* batch;
images/s is the run's own figure from ``summary.json`` (training steps of the epochs after the
first: data loading, forward, losses, backward, all-reduce, optimizer; start-up, the first epoch's
warm-up and evaluation excluded). On the CPU
each process gets ``--cores / N`` threads, so the processes share the same cores. On CUDA every
precision in ``--amp`` is measured, with the peak GPU memory of rank 0.

    python benchmarks/scale.py                          # CPU, 1 and 2 processes sharing the cores
    python benchmarks/scale.py --threads-per-proc 1 --out benchmarks/results/scale-1thread
    python benchmarks/scale.py --device cuda --procs 1 --amp off,bf16 --images 512 --size 320 --batch 32

Results: a rich table, and JSON in benchmarks/results/scale.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def detkd(args: list[str], procs: int, threads: int) -> None:
    launcher = [sys.executable, "-m", "distill"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "distill"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(launcher + args)}\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2")
    parser.add_argument("--amp", default="off", help="precisions, e.g. off,bf16 (CUDA: fp16 too)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    parser.add_argument("--threads-per-proc", type=int, default=None, help="fixed threads per process (default: --cores / procs)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (every process count)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--student", default="gfl-tiny", help="train recipe; distill uses ld-tiny's losses on the same student")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    data, teacher = args.out / "data", args.out / "teacher"
    common = ["--set", f"data.image_size={args.size}", "--set", f"train.batch_size={args.batch}", "--set", "train.eval_every=1000", "--no-progress"]
    if not (data / "val.json").is_file():
        detkd(["data", "scenes", str(data), "--train", str(args.images), "--val", "8", "--size", str(args.size), "--seed", "0"], 1, args.cores)
    if not (teacher / "summary.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        detkd(["train", "gfl-tiny", "--data", str(data), "--out", str(teacher), "--epochs", "1", "--device", args.device, *common], 1, args.cores)

    rows = []
    for amp in args.amp.split(","):
        for mode in ("train", "distill"):
            for procs in map(int, args.procs.split(",")):
                run = args.out / f"{mode}-{amp}-p{procs}"
                shutil.rmtree(run, ignore_errors=True)
                threads = args.threads_per_proc or (max(1, args.cores // procs) if args.device == "cpu" else 1)
                if mode == "train":
                    cmd = ["train", args.student, "--data", str(data)]
                else:
                    cmd = ["distill", "ld-tiny", "--teacher", str(teacher), "--data", str(data), "--force"]
                cmd += ["--out", str(run), "--epochs", str(args.epochs), "--device", args.device, "--amp", amp, "--set", f"train.threads={threads}", *common]
                detkd(cmd, procs, threads)
                summary = json.loads((run / "summary.json").read_text())
                rows.append({"mode": mode, "amp": amp, "procs": procs, "threads_per_proc": threads, "images_per_s": summary.get("steady_images_per_s") or summary["images_per_s"],
                             "train_seconds": summary["train_seconds"], "steps": summary["steps"], "peak_memory_mb": summary.get("peak_memory_mb")})
    for row in rows:
        one = next(r for r in rows if r["mode"] == row["mode"] and r["amp"] == row["amp"] and r["procs"] == min(map(int, args.procs.split(","))))
        row["ratio_to_fewest_procs"] = round(row["images_per_s"] / one["images_per_s"], 3)

    table = Table(title=f"detkd scale: {args.device}, {args.images} scenes at {args.size} px, global batch {args.batch}, {args.epochs} epochs")
    for col in ("mode", "amp", "procs", "threads/proc", "images/s", "ratio", "peak MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], r["amp"], str(r["procs"]), str(r["threads_per_proc"]), f"{r['images_per_s']:.1f}", f"{r['ratio_to_fewest_procs']:.2f}",
                      "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}")
    Console().print(table)
    record = {
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None,
        "cpu_cores": args.cores, "images": args.images, "size": args.size, "global_batch": args.batch, "epochs": args.epochs,
        "torch": torch.__version__, "python": platform.python_version(), "rows": rows,
    }
    path = args.out.parent / f"{args.out.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
