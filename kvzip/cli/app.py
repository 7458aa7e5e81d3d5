"""The ``kvzip`` Typer application: registers one command per module."""

from __future__ import annotations

import typer

from kvzip import __version__
from kvzip.atomic import install_signal_handlers

app = typer.Typer(
    name="kvzip",
    help="Store and ship LLM KV caches: prefill a text once, keep its cache small in a .kvz file, "
    "attach it to the model later.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvzip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """kvzip: compressed, streamable KV caches."""


def _register() -> None:
    from kvzip.cli import (
        ask,
        bench,
        calibrate,
        clean,
        decode,
        encode,
        fetch,
        generate,
        info,
        precache,
        serve,
        store,
        verify,
    )

    for module in (encode, info, decode, verify, generate, fetch, serve, precache, ask, store, calibrate, bench, clean):
        module.register(app)


_register()


def main() -> None:
    install_signal_handlers()  # SIGTERM/SIGHUP unwind like Ctrl-C: no temporary file left behind
    app()
