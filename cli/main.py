"""``rockq``: quantise network checkpoints from YAML recipes.

This module holds the Typer :data:`app`: it registers the commands of
:mod:`cli.quantise_commands`, :mod:`cli.finetune_command` and :mod:`cli.info_commands`,
and turns errors into exit codes in one place. Each command parses its options, calls into
:mod:`transform_core`, and renders the result; torch and the library are imported inside
the commands, so ``rockq --help`` stays fast.

Exit codes: 0 success, 1 internal error, 2 bad input (one line on stderr, naming the file,
key or tensor and the fix; ``--debug`` shows the traceback), 3 ``report --check`` found a
tensor outside its hardware limit, 130 interrupted (Ctrl-C), 143 and 129 stopped by SIGTERM
and SIGHUP. An interrupted command leaves no file half-written.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from cli import finetune_command, info_commands, process, quantise_commands

app = typer.Typer(
    name="rockq",
    help="Quantise neural-network checkpoints with a transformation-in-training pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def _version_callback(value: bool) -> None:
    if value:
        # The installed distribution's version: no torch import, so this stays fast.
        from importlib.metadata import PackageNotFoundError, version

        try:
            shown = version("rockq")
        except PackageNotFoundError:  # running from a source tree that is not installed
            from transform_core import __version__ as shown
        typer.echo(f"rockq {shown}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Quantise neural-network checkpoints with a transformation-in-training pipeline."""


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"rockq: error: {message}", err=True)
    return typer.Exit(code)


def _interrupted(err: KeyboardInterrupt) -> typer.Exit:
    """Ctrl-C exits 130; a stop signal 128 plus its number, as the shell reports it."""
    if isinstance(err, process.Terminated):
        return _fail(f"stopped by {err}; no file was left half-written", 128 + err.signum)
    return _fail("interrupted; no file was left half-written", EXIT_INTERRUPTED)


def handle_errors(command: F) -> F:
    """Turn user errors into one line and exit 2, other errors into exit 1.

    A command's ``debug`` argument shows the traceback instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from transform_core.errors import RockqError
        from transform_core.kernels import check_environment

        process.freeze_imports()  # torch is imported now
        try:
            check_environment()
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as err:
            raise _interrupted(err) from None
        except SystemExit as err:
            # rockq itself never calls sys.exit inside a command: this came from the user's
            # code it imported, and would otherwise end the command with that code, silently.
            if kwargs.get("debug"):
                raise
            call = "sys.exit()" if err.code is None else f"sys.exit({err.code!r})"
            raise _fail(
                f"code it imported called {call} (a custom transform, loss, data function or "
                "network class); nothing was written: make that code raise an exception or "
                "return instead",
                EXIT_USER_ERROR,
            ) from None
        except RockqError as err:
            if kwargs.get("debug"):
                raise
            raise _fail(str(err), EXIT_USER_ERROR) from None
        except Exception as err:
            if kwargs.get("debug"):
                raise
            raise _fail(
                f"internal error: {type(err).__name__}: {err} (run again with --debug for the "
                "traceback, and please report it)",
                EXIT_INTERNAL_ERROR,
            ) from None

    return wrapper  # type: ignore[return-value]


def _help(command: Callable[..., Any]) -> str:
    """A command's docstring as help: paragraphs kept, line breaks inside them dropped.

    Typer keeps single line breaks after the first paragraph, which would show the
    docstring's source wrapping in the terminal.

    Example:
        >>> def f():
        ...     pass
        >>> f.__doc__ = "Do it.\\n\\n    In two\\n    lines.\\n    "
        >>> _help(f)
        'Do it.\\n\\nIn two lines.'
    """
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


def _register(command: Callable[..., Any], name: str | None = None) -> None:
    app.command(name, help=_help(command))(handle_errors(command))


# In the order `rockq --help` lists them: the flow first, then what helps to use it.
_register(quantise_commands.inspect)
_register(quantise_commands.patch)
_register(quantise_commands.burn_in_command, "burn-in")
_register(finetune_command.finetune_command, "finetune")
_register(quantise_commands.quantize)
_register(quantise_commands.report)
_register(info_commands.recipes)
_register(info_commands.transforms)
_register(info_commands.demo)


def run() -> None:
    """The ``rockq`` console entry point: like ``app()``, with one-line usage errors.

    Typer prints a usage error (a missing option, an unknown flag) as a multi-line box;
    rockq's rule for bad input is one line on stderr and exit 2, so it is caught here.
    """
    # Typer re-exports click's BadParameter but not its base; newer Typer vendors click,
    # so the base class is found through the MRO rather than imported by module name.
    click_error: type[Exception] = next(
        c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
    )
    process.claim()
    try:
        code = app(standalone_mode=False)
    except click_error as err:
        ctx = getattr(err, "ctx", None)
        command = f"{ctx.command_path} " if ctx is not None else "rockq "
        format_message = getattr(err, "format_message", None)
        message = str(format_message() if callable(format_message) else err)
        if message.strip():  # empty when the help was shown for a bare `rockq`
            typer.echo(f"rockq: error: {message} (see '{command}--help')", err=True)
        sys.exit(getattr(err, "exit_code", 2))
    except typer.Abort:
        typer.echo("rockq: error: interrupted; no file was left half-written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        process.freeze_imports()  # what the command made, too: the exit walks nothing
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()
