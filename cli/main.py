"""``rockq``: quantise network checkpoints from YAML recipes.

This module holds the Typer :data:`app`: it registers the commands of
:mod:`cli.quantise_commands`, :mod:`cli.finetune_command` and :mod:`cli.info_commands`,
and turns errors into exit codes in one place. Each command parses its options, calls into
:mod:`transform_core`, and renders the result; torch and the library are imported inside
the commands, so ``rockq --help`` stays fast.

Exit codes: 0 success, 1 internal error, 2 bad input (one line on stderr, naming the file,
key or tensor and the fix; ``--debug`` shows the traceback), 3 ``report --check`` found a
tensor outside its hardware limit, 130 interrupted (Ctrl-C), 143 and 129 stopped by SIGTERM
and SIGHUP, 141 stdout closed (``rockq inspect big.pt | head``: quietly, as SIGPIPE ends other
tools). An interrupted command leaves no file half-written.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import unicodedata
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
# A closed stdout exits as a process killed by SIGPIPE (13) shows in the shell, 128 + 13,
# like `yes | head -1` under `set -o pipefail`: scripts already treat 141 as "the reader
# stopped". Python's own suggestion, exit 1, would read here as rockq's internal error.
EXIT_BROKEN_PIPE = 141


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


def one_line(message: str) -> str:
    """``message`` with line breaks and other control characters escaped, as ``repr`` does.

    A tensor name or an exception from user code may hold a newline; the error must stay
    one line, and a terminal escape in a name must not restyle the terminal.

    Example:
        >>> print(one_line("nl.safetensors: a\\nb.weight: holds 1 NaN"))
        nl.safetensors: a\\nb.weight: holds 1 NaN
    """
    # Cc: control characters (newline, tab, escape, NEL); Zl, Zp: Unicode line and
    # paragraph separators, which terminals and editors may also break lines on.
    return "".join(
        repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in message
    )


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"rockq: error: {one_line(message)}", err=True)
    return typer.Exit(code)


def _from_closed_pipe(err: SystemExit) -> bool:
    """Whether ``err`` reports a closed stdout rather than code that called ``sys.exit``.

    Rich ends a print to a closed pipe with ``SystemExit(1)`` raised while it handles the
    ``BrokenPipeError`` (``Console.on_broken_pipe``), and so does Typer for a write outside
    a command: that ``SystemExit`` has the ``BrokenPipeError`` as its context.
    """
    return isinstance(err.__context__, BrokenPipeError)


def _closed_pipe() -> typer.Exit:
    """End quietly after stdout was closed: nothing on stderr, exit 141.

    stdout goes to devnull first, as Python's note on SIGPIPE advises, so that the flush
    at exit does not print "Exception ignored ... BrokenPipeError".
    """
    with contextlib.suppress(OSError, ValueError):  # the closed pipe, or a closed stdout
        sys.stdout.flush()
    try:
        fileno = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # not a real file, as under CliRunner
        return typer.Exit(EXIT_BROKEN_PIPE)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)
    return typer.Exit(EXIT_BROKEN_PIPE)


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
        except BrokenPipeError:
            # A reader that stopped (`| head`) is no error, and what was written stays.
            raise _closed_pipe() from None
        except SystemExit as err:
            if _from_closed_pipe(err):
                raise _closed_pipe() from None
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
        # Output still buffered (a short --json) meets a closed pipe here, where it can be
        # handled, rather than in the flush at exit.
        sys.stdout.flush()
    except click_error as err:
        ctx = getattr(err, "ctx", None)
        command = f"{ctx.command_path} " if ctx is not None else "rockq "
        format_message = getattr(err, "format_message", None)
        message = one_line(str(format_message() if callable(format_message) else err))
        if message.strip():  # empty when the help was shown for a bare `rockq`
            typer.echo(f"rockq: error: {message} (see '{command}--help')", err=True)
        sys.exit(getattr(err, "exit_code", 2))
    except typer.Abort:
        typer.echo("rockq: error: interrupted; no file was left half-written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # outside a command: --version, --help
        code = _closed_pipe().exit_code
    except SystemExit as err:
        if not _from_closed_pipe(err):
            raise
        code = _closed_pipe().exit_code
    finally:
        process.freeze_imports()  # what the command made, too: the exit walks nothing
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()
