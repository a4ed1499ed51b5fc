"""SIGKILL a real ``detkd train`` repeatedly, inside and outside the save window; resume each time.

The final checkpoint, best checkpoint and training state must equal an uninterrupted run's tensor
for tensor, and metrics.jsonl must hold every step exactly once.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

TINY = ["--set", "data.image_size=64", "--set", "train.batch_size=4", "--set", "student.params.fpn_channels=8",
        "--set", "train.threads=1", "--set", "train.eval_every=1", "--epochs", "4", "--no-progress"]


def command(run, data):
    base = [sys.executable, "-m", "distill", "train"]
    if (run / "run.json").is_file():
        return base + ["--resume", str(run), "--no-progress"]
    return base + ["gfl-tiny", "--data", str(data), "--out", str(run), *TINY]


def saving(run) -> bool:
    """A temporary file of a checkpoint or training-state write exists: the process is inside a save."""
    folder = run / "checkpoints"
    if folder.is_dir() and any(name.endswith(".tmp") for name in os.listdir(folder)):
        return True
    return run.is_dir() and any(name.startswith(".train_state") for name in os.listdir(run))


def run_and_kill(run, data, how: str, delay: float) -> bool:
    """Start (or resume) the run; SIGKILL it at the next save ('save') or after ``delay`` s. True if killed."""
    # DETKD_TEST_SAVE_PAUSE holds every atomic write 0.2 s between its temporary file and the rename,
    # so that the polling below reliably lands the kill inside a save
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETKD_TEST_SAVE_PAUSE": "0.2"}
    proc = subprocess.Popen(command(run, data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    started = time.monotonic()
    while proc.poll() is None:
        if (how == "save" and saving(run)) or (how == "time" and time.monotonic() - started > delay):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return False


def tensors(run):
    out = {}
    for name in ("checkpoints/last.safetensors", "checkpoints/best.safetensors", "train_state.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(run / name)).items()})
    return out


def test_repeated_sigkills_resume_to_the_uninterrupted_result(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "distill", "data", "scenes", str(data), "--train", "16", "--val", "4", "--size", "64", "--seed", "3"], check=True, capture_output=True)
    straight = tmp_path / "straight"
    assert not run_and_kill(straight, data, "none", 0)

    killed = tmp_path / "killed"
    rng = random.Random(0)
    plan = ["save", ("time", rng.uniform(2, 6)), "save", "save", ("time", rng.uniform(3, 8))]
    kills = {"save": 0, "time": 0}
    for item in plan:
        how, delay = (item, 0.0) if isinstance(item, str) else item
        kills[how] += run_and_kill(killed, data, how, delay)
    while run_and_kill(killed, data, "none", 0):  # finish
        pass
    assert kills["save"] == 3 and kills["time"] >= 1, kills
    assert not list(killed.rglob("*.tmp"))  # leftovers of the kills were removed
    a, b = tensors(straight), tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(16))
    assert json.loads((killed / "summary.json").read_text())["steps"] == 16
