"""``kvzip decode``: .kvz -> safetensors."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import err_console, progress_bars
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import apply_max_memory, max_memory_option


@handle_errors
def decode_command(
    file: Path = typer.Argument(..., help="A .kvz file."),
    output: Path = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
    level: str = typer.Option(None, "--level", "-l", help="Level to decode (default: the file's best)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    max_memory: str = max_memory_option(),
) -> None:
    """Decode a .kvz into safetensors: layers.{i}.key and layers.{i}.value shaped (kv_heads, tokens, head_dim), and token_ids."""
    apply_max_memory(max_memory)
    with progress_bars(not quiet) as progress:
        summary = api.decode(file, output, level=level, progress=progress)
    err_console.print(
        f"[bold green]wrote[/] {summary.out}: {summary.tokens} tokens, level {summary.level}, "
        f"{summary.seconds:.2f} s"
    )


def register(app: typer.Typer) -> None:
    app.command("decode")(decode_command)
