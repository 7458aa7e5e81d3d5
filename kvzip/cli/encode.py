"""``kvzip encode``: text -> prefill -> .kvz."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from kvzip import api
from kvzip import importance as scoring
from kvzip.cli.console import (
    err_console,
    human_bytes,
    out_console,
    progress_bars,
    status,
)
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import (
    apply_max_memory,
    device_option,
    keep_by_option,
    keep_option,
    keep_rule_option,
    max_memory_option,
    model_dtype_option,
)
from kvzip.errors import ContextTooLongError, InputError
from kvzip.levels import DEFAULT_LEVEL


def read_input(source: str, max_bytes: int) -> tuple[str, str]:
    """(text, name) from a path or ``-`` for stdin, refusing more than ``max_bytes``."""
    if source == "-":
        data = sys.stdin.buffer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ContextTooLongError(f"stdin holds more than the {max_bytes} bytes of text "
                                      "the model's context can hold")
        try:
            return data.decode("utf-8"), "<stdin>"
        except UnicodeDecodeError as exc:
            raise InputError(f"stdin is not UTF-8 text (byte {exc.start} is invalid)") from None
    return api.read_text(source, max_bytes), Path(source).name


@handle_errors
def encode_command(
    input: str = typer.Argument(..., help="Text file to prefill, or - for stdin."),
    output: Path = typer.Option(..., "-o", "--output", help="The .kvz file to write."),
    model: str = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    level: str = typer.Option(DEFAULT_LEVEL, "--level", "--levels", "-l", help="Quality level: lossless, high, balanced, small; several comma-separated store them all (e.g. --levels small,balanced,high)."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help=f"Tokens per independently decodable chunk (default: {api.DEFAULT_CHUNK_TOKENS}; with --keep F, about {api.DEFAULT_CHUNK_TOKENS}/F so that a chunk holds as many entries)."),
    dtype: str = typer.Option(None, "--dtype", help="Store the cache as float32, bfloat16 or float16 (default: as captured)."),
    chat: bool = typer.Option(False, "--chat", help="Cache the text as the opening of a user turn in the model's chat template."),
    profile: str = typer.Option(None, "--profile", help="Calibration profile (.kvzprofile file or digest) for the lossy levels (default: the newest one for the model in the profile directory)."),
    if_no_profile: str = typer.Option("calibrate", "--if-no-profile", help="When the model has no profile yet: calibrate (build one now, once), uncalibrated (use the uncalibrated codec) or error."),
    importance: str = typer.Option(None, "--importance", help="Score every entry (reconstruct | prefill | keynorm) and spend the lossy levels' bits by importance, at about the same size; none: uniform precision (default: as the model's calibration profile says, see kvzip calibrate --importance-above; without a profile, prefill; with --keep, the scorer it drops by)."),
    keep: float = keep_option(),
    keep_by: str = keep_by_option(),
    keep_rule: str = keep_rule_option(),
    prefill_cache: str = typer.Option("auto", "--prefill-cache", help="Where the model keeps its cache while it reads the text: memory, disk (unlinked files beside the output, for a CPU whose memory cannot hold it; the .kvz is the same) or auto (disk when the model runs on the CPU and its cache would take more than half of --max-memory)."),
    max_memory: str = max_memory_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Prefill a text with the model and write its KV cache as a .kvz file."""
    apply_max_memory(max_memory)
    if input != "-":
        api.input_size(input)  # a missing or unreadable input fails before the model loads
    levels = [x.strip() for x in level.split(",") if x.strip()]
    scoring.check_options(importance, keep, keep_rule, keep_by)  # before the model loads
    with status("loading model…", not quiet):
        km = api.load_model(model, device=device, model_dtype=model_dtype)
    text, name = read_input(input, km.max_text_bytes)
    with progress_bars(not quiet) as progress:
        summary = api.encode(
            text, output, model=km, levels=levels, chunk_tokens=chunk_tokens, dtype=dtype,
            chat=chat, source_name=name, profile=profile, if_no_profile=if_no_profile,
            importance=importance, keep=keep, keep_rule=keep_rule, keep_by=keep_by, prefill_cache=prefill_cache,
            progress=progress,
        )
    if json_out:
        out_console.print_json(data=summary.to_json())
        return
    err_console.print(
        f"[bold green]wrote[/] {summary.path}: {summary.tokens} tokens in {summary.chunks} "
        f"chunks, levels {', '.join(summary.levels)} ({summary.dtype})\n"
        f"  raw cache {human_bytes(summary.raw_bytes)} -> file {human_bytes(summary.file_bytes)}"
        f"  ratio {summary.ratio:.2f}x\n"
        f"  prefill {summary.prefill_seconds:.2f} s, encode {summary.encode_seconds:.2f} s"
        + (f"\n  calibration profile {summary.profile[:16]}…" if summary.profile else "")
        + (f", bits spent by importance ({summary.importance})" if summary.importance else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)
