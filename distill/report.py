"""Rich progress bars and tables shared by every long command."""
from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console(stderr=False)


def make_progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def metrics_table(title: str, rows: Mapping[str, Mapping[str, Any]], columns: list[str] | None = None) -> Table:
    """A table with one row per entry of ``rows`` (row name -> {column: value})."""
    columns = columns or sorted({c for r in rows.values() for c in r})
    table = Table(title=Text(title))
    table.add_column("")
    for c in columns:
        table.add_column(c, justify="right")
    for name, row in rows.items():
        table.add_row(name, *[fmt(row.get(c)) for c in columns])
    return table


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def key_value_table(title: str, values: Mapping[str, Any]) -> Table:
    """One metric per row: fits a terminal of any width. The title is plain text (paths and
    ``[split]`` are not read as rich markup)."""
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, fmt(value))
    return table


err_console = Console(stderr=True)


def warn(message: str) -> None:
    """One 'warning:' line on stderr; the message is printed literally (paths may hold brackets)."""
    err_console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True, highlight=False)
