"""``detkd recipes``: list the ready recipes."""
from __future__ import annotations

import typer
from rich.table import Table

from distill.cli.app import app, user_errors
from distill.report import console


@app.command("recipes")
@user_errors
def recipes_command(
    kind: str = typer.Option(None, help="Only recipes of this kind: teacher, student or distill."),
) -> None:
    """List recipes: name, kind, student, teacher and purpose."""
    from recipes import list_recipes, load_recipe

    table = Table(title="detkd recipes")
    for column in ("name", "kind", "student", "teacher", "purpose"):
        table.add_column(column, overflow="fold")
    for name in list_recipes():
        recipe = load_recipe(name)
        if kind and recipe.kind != kind:
            continue
        backbone = recipe.student.params.get("backbone")
        student = f"{recipe.student.name} ({backbone})" if backbone else recipe.student.name
        teacher = recipe.teacher.recipe if recipe.teacher and recipe.teacher.recipe else "-"
        table.add_row(name, recipe.kind, student, teacher, recipe.purpose)
    console.print(table)
