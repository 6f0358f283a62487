"""The Typer app, global options, and the one place errors become exit codes.

Exit codes: 0 success / equivalent, 1 verification mismatch, 2 bad input or usage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from convtool import __version__
from convtool.cli.flags import cli_message
from convtool.errors import ConvtoolError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


def _debug_requested(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("CONVTOOL_DEBUG", "") not in ("", "0")


def _fail(message: str) -> None:
    """One line on stderr, exit 2."""
    typer.echo(f"convtool: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like KeyboardInterrupt, so temporary files go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception for the length of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]
    previous = {}
    for signum in wanted:
        with contextlib.suppress(OSError, ValueError):
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, handler)


class _Group(TyperGroup):
    """Runs commands with click's standalone handling off, so every failure is one line."""

    def main(self, args: Any = None, *posargs: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        kwargs["standalone_mode"] = False
        try:
            with _signals_unwind():
                result = super().main(argv, *posargs, **kwargs)
        except Terminated as exc:
            name = signal.Signals(exc.signum).name
            typer.echo(f"convtool: stopped by {name}; unfinished outputs were removed", err=True)
            sys.exit(128 + exc.signum)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("convtool: aborted", err=True)
            sys.exit(130)
        except typer.TyperException as exc:  # usage errors from the (vendored) click parser
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":
                typer.echo(exc.format_message())
                sys.exit(EXIT_OK)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(f"{exc.format_message()}{hint}")
        except ConvtoolError as exc:
            if _debug_requested(argv):
                traceback.print_exc()
            _fail(cli_message(exc))  # the library's parameters, said as flags
        except KeyboardInterrupt:
            typer.echo("convtool: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            if _debug_requested(argv):
                traceback.print_exc()
            _fail("out of memory; try --sparse, a smaller input shape, or --max-memory")
        except Exception as exc:
            if _debug_requested(argv):
                traceback.print_exc()
            _fail(
                f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                f" (this is a bug in convtool; rerun with --debug for the traceback)"
            )
        if result == 130:  # typer turns KeyboardInterrupt into exit code 130
            typer.echo("convtool: interrupted", err=True)
        sys.exit(result if isinstance(result, int) else EXIT_OK)


app = typer.Typer(
    cls=_Group,
    name="convtool",
    help="Turn convolution layers into their exact matrices, locally-connected and "
    "fully-connected equivalents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings are wrapped prose: join their lines
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convtool {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """convtool: exact linear-algebra equivalents of PyTorch convolutions."""


def main() -> None:
    """Console-script entry point."""
    app()
