"""The ``detkd`` command line (typer). Each command lives in a small module of this package."""
from __future__ import annotations

import functools
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

data_app = typer.Typer(help="Datasets: generate the embedded default data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Turn a ``DetkdError`` into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DetkdError as exc:
            # Text, not markup: user paths and messages like '[x, y, w, h]' print literally.
            err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _register_commands() -> None:
    # Imported for their @app.command side effects; kept here so ``app`` is complete on import.
    from distill.cli import cache_cmd, data_cmds, demo_cmd, distill_cmd, info_cmds, train_cmds  # noqa: F401


_register_commands()


def main() -> None:
    app()
