"""``kvzip fetch``: download a .kvz over HTTP, verified, written atomically."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip.cli.console import err_console, human_bytes, out_console, progress_bars
from kvzip.cli.errors import handle_errors


@handle_errors
def fetch_command(
    url: str = typer.Argument(..., help="URL of a .kvz (kvzip serve-chunks, or any server with byte ranges)."),
    output: Path = typer.Option(..., "-o", "--output", help="The .kvz file to write."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a .kvz with byte ranges, check every chunk's checksum, then write it atomically."""
    from kvzip.stream.fetch import fetch

    with progress_bars(not quiet) as progress:
        summary = fetch(url, output, progress=progress)
    if json_out:
        out_console.print_json(data=summary.to_json())
        return
    err_console.print(
        f"[bold green]fetched[/] {summary.path}: {human_bytes(summary.bytes)} in "
        f"{summary.seconds:.2f} s, {summary.payloads_verified} payloads verified",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("fetch")(fetch_command)
