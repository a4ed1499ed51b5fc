"""The ``detkd`` command line (typer). Each command lives in a small module of this package."""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import typer
from rich.console import Console
from rich.text import Text

from distill.errors import DetkdError

app = typer.Typer(
    name="detkd",
    help="Knowledge distillation for object detectors: train, distill, cache, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEVICE_HELP = "auto (CUDA when available) | cpu | cuda | cuda:N; under torchrun each rank uses cuda:LOCAL_RANK."
AMP_HELP = "Mixed precision: off | bf16 | fp16 (fp16 with a GradScaler, CUDA only)."

data_app = typer.Typer(help="Datasets: generate the embedded data (scenes, clutter).", no_args_is_help=True)
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def report_error(message: str) -> None:
    """Print ``error: MESSAGE`` as one line on stderr; under torchrun, rank 0 alone prints.

    Every rank of a torchrun job meets the same user error (same recipe, data and folders), so one
    line is printed, not one per rank. Each rank then records the line in the elastic agent's error
    file (``TORCHELASTIC_ERROR_FILE``, set by torchrun; after printing, so that rank 0's file means
    its line is out): ``python -m distill.launch`` prints another rank's line when rank 0 printed
    none, and plain torchrun shows it in its failure report.
    """
    if int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # Text, not markup: user paths and messages like '[x, y, w, h]' print literally.
        err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the line above is the report; the error file is for the launcher


def user_errors(fn: Callable) -> Callable:
    """Turn a ``DetkdError`` into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DetkdError as exc:
            report_error(str(exc))
            raise typer.Exit(code=2) from None

    return wrapper


def _register_commands() -> None:
    # Imported for their @app.command side effects; kept here so ``app`` is complete on import.
    from distill.cli import (  # noqa: F401  # noqa: F401  (after a run: pictures, table)
        cache_cmd,
        compare_cmd,
        data_cmds,
        demo_cmd,
        distill_cmd,
        export_cmd,  # noqa: F401  (ship the student: ONNX)
        info_cmds,
        plot_cmd,
        refine_cmd,  # noqa: F401  (RefineBox: a box refiner on a frozen detector)
        show_cmd,
        train_cmds,
    )


_register_commands()


def main() -> None:
    app()
