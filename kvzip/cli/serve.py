"""``kvzip serve-chunks``: serve the .kvz files under a directory over HTTP."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip.cli.console import err_console
from kvzip.cli.errors import handle_errors
from kvzip.errors import InputError


@handle_errors
def serve_command(
    root: Path = typer.Argument(..., help="Directory whose .kvz files (recursively) are served."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0 picks a free one)."),
    throttle_mbps: float = typer.Option(None, "--throttle-mbps", hidden=True, help="Test only: pace response bodies to this many Mbit/s, shared by all responses."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log."),
) -> None:
    """Serve every .kvz under ROOT: listing, manifests, chunk payloads, whole files with byte ranges,
    and the calibration profiles they name (<digest>.kvzprofile under ROOT, or in this machine's
    profile directory, KVZIP_PROFILE_DIR, for a digest a served file names)."""
    from kvzip.stream.server import Throttle, serve

    if not root.is_dir():
        raise InputError(f"not a directory: {root}")
    if throttle_mbps is not None and throttle_mbps <= 0:
        raise InputError(f"--throttle-mbps must be positive, got {throttle_mbps}")
    throttle = Throttle.constant(throttle_mbps) if throttle_mbps else None

    def ready(url: str) -> None:
        note = f" (throttled to {throttle_mbps:g} Mbit/s)" if throttle else ""
        err_console.print(f"serving {root} at {url}{note}; listing at {url}/contexts; Ctrl-C stops",
                          highlight=False, soft_wrap=True)

    try:
        serve(root, host, port, throttle=throttle, on_ready=ready,
              log_level="warning" if quiet else "info")
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT once it has shut down cleanly
        pass


def register(app: typer.Typer) -> None:
    app.command("serve-chunks")(serve_command)
