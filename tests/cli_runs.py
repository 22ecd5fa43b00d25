"""Running ``rockq`` commands in the tests' process, as the CLI tests do."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

# Plain output whatever the environment: no forced colours or terminal, which would also
# turn on progress bars.
_PLAIN = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None}


def runner() -> CliRunner:
    return CliRunner(env=_PLAIN)


def ok(*args: str | Path) -> str:
    """Run a command that must succeed; return its stdout."""
    result = runner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def user_error(*args: str | Path) -> str:
    """Run a command that must fail with a user error; return its one stderr line."""
    result = runner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("rockq: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output
    return result.stderr.strip()
