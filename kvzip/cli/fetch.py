"""``kvzip fetch``: download a .kvz over HTTP, verified, written atomically."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip.cli.console import err_console, human_bytes, out_console, progress_bars
from kvzip.cli.errors import handle_errors
from kvzip.stream.http import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_MIN_SPEED,
    DEFAULT_SPEED_WINDOW,
    DownloadLimits,
)


# The download limits, shared with `kvzip generate URL`; None (not given) is the default.
def max_download_seconds_option():
    return typer.Option(None, "--max-download-seconds", metavar="SECONDS", help=(
        f"Give up when the whole download takes longer than this [default: {DEFAULT_MAX_SECONDS:g}; "
        "0: no limit]."))


def min_speed_option():
    return typer.Option(None, "--min-speed", metavar="BYTES/S", help=(
        "Give up when a response arrives slower than this, on average over --min-speed-window "
        f"[default: {DEFAULT_MIN_SPEED:g}; 0: no minimum]."))


def min_speed_window_option():
    return typer.Option(None, "--min-speed-window", metavar="SECONDS", help=(
        f"The window --min-speed is measured over [default: {DEFAULT_SPEED_WINDOW:g}]."))


def other_hosts_option():
    return typer.Option(False, "--allow-redirects-to-other-hosts", help=(
        "Follow redirects to another scheme, host or port (by default only redirects within "
        "the URL's own origin are followed)."))


def download_limits(max_seconds: float | None, min_speed: float | None, window: float | None,
                    other_hosts: bool) -> DownloadLimits:
    """The limits the download options ask for (InputError for values out of range)."""
    seconds = DEFAULT_MAX_SECONDS if max_seconds is None else (None if max_seconds == 0 else max_seconds)
    return DownloadLimits(
        max_seconds=seconds,
        min_speed=DEFAULT_MIN_SPEED if min_speed is None else min_speed,
        min_speed_window=DEFAULT_SPEED_WINDOW if window is None else window,
        allow_other_hosts=other_hosts,
    )


@handle_errors
def fetch_command(
    url: str = typer.Argument(..., help="URL of a .kvz (kvzip serve-chunks, or any server with byte ranges)."),
    output: Path = typer.Option(..., "-o", "--output", help="The .kvz file to write."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    max_download_seconds: float = max_download_seconds_option(),
    min_speed: float = min_speed_option(),
    min_speed_window: float = min_speed_window_option(),
    allow_other_hosts: bool = other_hosts_option(),
) -> None:
    """Download a .kvz with byte ranges, check every chunk's checksum, then write it atomically.

    A calibration profile the file names and this machine lacks is fetched from
    beside it (<same directory>/<digest>.kvzprofile), checked against its
    SHA-256 and stored in the profile directory.  A server too slow (see
    --min-speed, --max-download-seconds) or redirecting to another host is an
    error, and the output is left untouched.
    """
    from kvzip.stream.fetch import fetch

    limits = download_limits(max_download_seconds, min_speed, min_speed_window, allow_other_hosts)
    with progress_bars(not quiet) as progress:
        summary = fetch(url, output, limits=limits, progress=progress)
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
