"""``kvzip clean``: remove the temporary files that killed kvzip processes left."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip import atomic
from kvzip.cli.console import err_console, out_console
from kvzip.cli.errors import handle_errors
from kvzip.errors import InputError


@handle_errors
def clean_command(
    directories: list[Path] = typer.Argument(..., help="Directories kvzip wrote into."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be removed."),
) -> None:
    """Remove kvzip's stale temporary files (*.kvzip-tmp) from DIRECTORIES.

    Stale: left by a process of this host that is no longer running, or untouched for a
    day. A live writer's files are never removed; writers also do this for their own
    directory before they start."""
    for directory in directories:
        if not directory.is_dir():
            raise InputError(f"not a directory: {directory}")
    total = 0
    for directory in directories:
        for temp in atomic.sweep_stale(directory, dry_run=dry_run):
            out_console.print(f"{'would remove' if dry_run else 'removed'} {temp.path}")
            total += 1
    err_console.print(f"{total} stale temporary file(s) {'found' if dry_run else 'removed'}")


def register(app: typer.Typer) -> None:
    app.command("clean")(clean_command)
