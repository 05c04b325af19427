"""Run `toolkit ...` in-process with Typer's CliRunner, as a user would type it."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner, Result

from toolkit.cli import app

_runner = CliRunner()


def invoke(*args: Any, input: str | None = None) -> Result:
    """`toolkit ARGS`; arguments may be Paths or numbers. Whatever the outcome, never a traceback."""
    result = _runner.invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    return result
