"""One table from exceptions to one-line messages and exit codes.

Known errors (every :class:`~kvzip.errors.KvzipError`, and OS errors on the
user's files) print one line on stderr and exit non-zero.  Anything else is a
bug: it prints one line too, unless ``KVZIP_DEBUG=1`` asks for the traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from kvzip.cli.console import err_console
from kvzip.errors import KvzipError, Terminated

EXIT_OS_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BUG = 70

F = TypeVar("F", bound=Callable[..., Any])


def describe(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception, or raise it again if it is a bug in debug mode."""
    if isinstance(exc, KvzipError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}", EXIT_OS_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return str(exc), exc.exit_code
    if os.environ.get("KVZIP_DEBUG"):
        raise exc
    return (
        f"internal error: {type(exc).__name__}: {exc} (set KVZIP_DEBUG=1 for the traceback)",
        EXIT_BUG,
    )


def handle_errors(command: F) -> F:
    """Decorate a command so library errors become one line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SystemExit:  # rich ends a write to a closed pipe (`kvzip info F | head`) so
            raise  # quietly, with status 1: not a bug to report
        except BaseException as exc:  # noqa: BLE001 - the table decides
            message, code = describe(exc)
            err_console.print(f"[bold red]kvzip: error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]
