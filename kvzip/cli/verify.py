"""``kvzip verify``: every checksum, every chunk."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import out_console
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import apply_max_memory, max_memory_option
from kvzip.errors import ChecksumError


@handle_errors
def verify_command(
    file: Path = typer.Argument(..., help="A .kvz file."),
    max_memory: str = max_memory_option(),
) -> None:
    """Check the header, the index and every payload's checksum, and decode every chunk."""
    apply_max_memory(max_memory)
    report = api.verify(file)
    if report.ok:
        out_console.print(f"OK {report.path}: {report.checked_payloads} payloads verified")
        return
    for problem in report.problems:
        out_console.print(f"  {problem}")
    raise ChecksumError(f"{report.path} is damaged: {len(report.problems)} problem(s)")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_command)
