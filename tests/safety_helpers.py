"""Shared pieces of the safety tests: the CLI runner and the subcommands' minimal arguments."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from convtool.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

# every subcommand, with what it needs besides SOURCE and --input-shape
COMMANDS: dict[str, list[str]] = {
    "toeplitz": [],
    "inspect": [],
    "count-params": [],
    "convert": ["--to", "lc"],
    "verify": ["--trials", "1"],
}


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, exit_code: int = 2) -> str:  # type: ignore[no-untyped-def]
    """Assert a clean failure: the exit code, one line on stderr, nothing on stdout."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("convtool: error: ")
    return str(result.stderr)
