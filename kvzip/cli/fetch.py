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
    """Download a .kvz with byte ranges, check every chunk's checksum, then write it atomically.

    A calibration profile the file names and this machine lacks is fetched from
    beside it (<same directory>/<digest>.kvzprofile), checked against its
    SHA-256 and stored in the profile directory.
    """
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
    for line in profile_lines(summary.profiles):
        err_console.print(line, highlight=False, markup=False)


def profile_lines(profiles) -> list[str]:
    """One line per calibration profile a fetched file needs: fetched now, or already here."""
    lines = []
    for p in profiles:
        if p.fetched:
            lines.append(f"fetched calibration profile {p.digest[:12]}… ({human_bytes(p.bytes)}, "
                         f"SHA-256 verified) to {p.path}")
        else:
            lines.append(f"calibration profile {p.digest[:12]}… already here: {p.path}")
    return lines


def register(app: typer.Typer) -> None:
    app.command("fetch")(fetch_command)
