"""Helpers shared by the CLI tests: run ``detkd`` through typer's runner, check one-line errors."""
from typer.testing import CliRunner

from distill.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The single 'error: ...' line of a command that failed with exit code 2."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    return lines[0]


# The tiny setting of the CLI tests: 64 px inputs, batch 4, no progress bar.
TINY_SETS = ["--set", "data.image_size=64", "--set", "train.batch_size=4"]
SMALL = [*TINY_SETS, "--no-progress"]
# The same with an 8-channel FPN: the cheapest GFL the failure / bad-input tests train and break.
SMALL_FPN8 = [*TINY_SETS, "--set", "student.params.fpn_channels=8", "--no-progress"]


def make_scenes(out, train: int = 8, val: int = 4):
    """``detkd data scenes OUT`` at 64 px, seed 3 (the CLI tests' data); returns ``out``."""
    result = invoke("data", "scenes", out, "--train", train, "--val", val, "--size", 64, "--seed", 3)
    assert result.exit_code == 0, result.output
    return out


def train_one_epoch(recipe: str, data, run, setting=SMALL):
    """``detkd train RECIPE`` for one epoch in the tiny ``setting``; returns the run folder."""
    result = invoke("train", recipe, "--data", data, "--out", run, "--epochs", 1, *setting)
    assert result.exit_code == 0, result.output
    return run



def api_metrics(run, data) -> dict:
    """COCO metrics of ``run``'s checkpoint (the one ``detkd eval RUN`` resolves) on ``data``'s val split,
    through the Python API in this process: what ``detkd eval`` must report, to the bit."""
    from distill.checkpoint import resolve_checkpoint
    from distill.data import DetectionTransform, load_dataset
    from distill.engine.evaluate import evaluate_detector
    from students.saved import load_detector

    model, meta = load_detector(resolve_checkpoint(run))
    return evaluate_detector(model, load_dataset(data, "val", DetectionTransform(meta["image_size"], hflip_prob=0.0)))
