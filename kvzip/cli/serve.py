"""``kvzip serve-chunks``: serve the .kvz files under a directory over HTTP."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip.cli.console import err_console
from kvzip.cli.errors import handle_errors
from kvzip.errors import InputError, Terminated


@handle_errors
def serve_command(
    root: Path = typer.Argument(..., help="Directory whose .kvz files (recursively) are served."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0 picks a free one)."),
    throttle_mbps: float = typer.Option(None, "--throttle-mbps", hidden=True, help="Test only: pace response bodies to this many Mbit/s, shared by all responses."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", metavar="SECONDS", help="Close a connection that has not sent a whole request head this many seconds after connecting or after its previous response."),
    max_connections: int = typer.Option(None, "--max-connections", metavar="N", show_default=False, help="Most connections open at once; past it a new one closes the one waiting longest for its request head, or is closed. Default: 512, or fewer if the open-file limit (ulimit -n) is low; a higher N raises that limit up to the hard one."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log."),
) -> None:
    """Serve every .kvz under ROOT: listing, manifests, chunk payloads, whole files with byte ranges,
    and the calibration profiles they name (<digest>.kvzprofile under ROOT, or in this machine's
    profile directory, KVZIP_PROFILE_DIR, for a digest a served file names)."""
    from kvzip.stream.server import Throttle, default_max_connections, reserve_descriptors, serve

    if not root.is_dir():
        raise InputError(f"not a directory: {root}")
    if throttle_mbps is not None and throttle_mbps <= 0:
        raise InputError(f"--throttle-mbps must be positive, got {throttle_mbps}")
    if not 0 < header_timeout < float("inf"):
        raise InputError(f"--header-timeout must be a positive number of seconds, got {header_timeout}")
    if max_connections is None:
        max_connections = default_max_connections()
    elif max_connections < 1:
        raise InputError(f"--max-connections must be at least 1, got {max_connections}")
    try:
        reserve_descriptors(max_connections)
    except InputError as exc:
        raise InputError(f"--max-connections {max_connections}: {exc}") from None
    throttle = Throttle.constant(throttle_mbps) if throttle_mbps else None

    def ready(url: str) -> None:
        note = f" (throttled to {throttle_mbps:g} Mbit/s)" if throttle else ""
        err_console.print(f"serving {root} at {url}{note}; listing at {url}/contexts; Ctrl-C stops",
                          highlight=False, soft_wrap=True)

    try:
        serve(root, host, port, throttle=throttle, on_ready=ready,
              log_level="warning" if quiet else "info", header_timeout=header_timeout,
              max_connections=max_connections)
    except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the signal once it shut down cleanly
        pass


def register(app: typer.Typer) -> None:
    app.command("serve-chunks")(serve_command)
