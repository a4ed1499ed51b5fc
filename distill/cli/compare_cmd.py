"""``detkd compare``: one table (and JSON) of finished runs."""
from __future__ import annotations

from pathlib import Path

import typer

from distill.cli.app import app, user_errors


@app.command("compare")
@user_errors
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare."),
    baseline: Path = typer.Option(None, "--baseline", help="Run folder of the student trained alone: gap closed starts there."),
    teacher: Path = typer.Option(None, "--teacher", help="Run folder of the teacher (default: each distill run's record of its teacher's AP)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the rows to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a --json file that detkd compare did not write."),
) -> None:
    """Recipe, teacher, AP/AP50/AP75/AR100, gap closed, train time, images/s, parameters, export size."""
    from rich.table import Table
    from rich.text import Text

    from distill.checkpoint import atomic_write_text
    from distill.outputs import check_output_file
    from distill.report import console
    from distill.viz.compare import COLUMNS, compare_rows, is_compare_record, read_record, rows_json

    if json_out is not None:
        check_output_file(json_out, ours=is_compare_record, overwrite=overwrite, what="--json")
    base = read_record(baseline) if baseline is not None else None
    top = read_record(teacher) if teacher is not None else None
    records = [read_record(run) for run in runs]
    listed = {r.path.resolve() for r in records}
    extra = [r for r in (base, top) if r is not None and r.path.resolve() not in listed]
    rows = compare_rows(extra + records, base, top)
    # one column per run, one row per quantity: fits a terminal of any width for a few runs
    title = "detkd compare" + (f" (gap closed from {base.name} to {top.name if top else 'each run’s recorded teacher'})" if base else "")
    table = Table(title=Text(title))
    table.add_column("")
    for row in rows:
        table.add_column(Text(row["run"] + (f"\n[{row['role']}]" if row["role"] else "")), justify="right", overflow="fold")
    for column in COLUMNS:
        table.add_row(column, *[Text(_cell(column, row[column])) for row in rows])
    console.print(table)
    if base is None:
        console.print("gap closed needs --baseline RUN (the student trained alone)", markup=False, highlight=False)
    if any(row["export MB"] is None for row in rows):
        console.print("export MB: '-' for a run without export/student.onnx (detkd export RUN)", markup=False, highlight=False)
    if json_out is not None:
        atomic_write_text(json_out, rows_json(rows, base, top))
        console.print(f"rows written to {json_out}", markup=False, highlight=False)


def _cell(column: str, value) -> str:
    from distill.report import fmt

    if value is None:
        return "-"
    if column == "params" and isinstance(value, int):
        return f"{value / 1e6:.2f}M"
    if column == "gap closed":
        return f"{100 * value:.1f}%"
    if column in ("train s", "images/s") and isinstance(value, (int, float)):
        return f"{value:.1f}"
    return fmt(value)
