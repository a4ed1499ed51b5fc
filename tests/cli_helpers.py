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
