"""``kvzip generate``: attach a .kvz to its model and continue."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import err_console, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.cli.fetch import (
    download_limits,
    max_download_seconds_option,
    min_speed_option,
    min_speed_window_option,
    other_hosts_option,
)
from kvzip.cli.options import apply_max_memory, device_option, max_memory_option, model_dtype_option
from kvzip.errors import InputError


@handle_errors
def generate_command(
    file: str = typer.Argument(..., help="A .kvz file, or the URL of a context served by `kvzip serve-chunks` (or any .kvz URL on a server with byte ranges)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text that follows the cached document (a question, for --chat files)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    model: str = typer.Option(None, "--model", "-m", help="The model that wrote the file (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    level: str = typer.Option(None, "--level", "-l", help="Level to decode (default: the file's best)."),
    compare: bool = typer.Option(False, "--compare", help="Also generate from the text with no cache, and report the time saved."),
    deadline: float = typer.Option(None, "--deadline", help="For a URL: seconds until the streamed context must be ready; quality adapts to the measured bandwidth."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    max_download_seconds: float = max_download_seconds_option(),
    min_speed: float = min_speed_option(),
    min_speed_window: float = min_speed_window_option(),
    allow_other_hosts: bool = other_hosts_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Attach the cached document to the model and generate after PROMPT (greedy).

    For a URL, the download options bound the download itself (its total time,
    its slowest acceptable speed, redirects to other hosts); --deadline only
    steers the quality streamed."""
    apply_max_memory(max_memory)
    if api.is_url(file):
        limits = download_limits(max_download_seconds, min_speed, min_speed_window, allow_other_hosts)
        _generate_url(file, prompt, max_new_tokens, model, level, compare, deadline, limits,
                      json_out, quiet, device, model_dtype)
        return
    if deadline is not None:
        raise InputError("--deadline applies to a streamed context (a URL), not a local file")
    given = [name for name, value in (
        ("--max-download-seconds", max_download_seconds), ("--min-speed", min_speed),
        ("--min-speed-window", min_speed_window),
        ("--allow-redirects-to-other-hosts", allow_other_hosts or None)) if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise InputError(f"{', '.join(given)} {verb} to a streamed context (a URL), not a local file")
    with status("loading model…", not quiet):
        km = api.load_model(model, device=device, model_dtype=model_dtype)
    with progress_bars(not quiet) as progress:
        result = api.generate(
            Path(file), prompt, model=km, max_new_tokens=max_new_tokens, level=level,
            compare=compare, progress=progress,
        )
    if json_out:
        out_console.print_json(data=asdict(result))
        return
    out_console.print(result.text.strip(), highlight=False, markup=False)
    err_console.print(
        f"[dim]{result.cached_tokens} cached + {result.prompt_tokens} prompt tokens, level "
        f"{result.level}: decode {result.decode_seconds:.2f} s, first token after "
        f"{result.first_token_seconds:.2f} s, {len(result.new_token_ids)} tokens in "
        f"{result.total_seconds:.2f} s[/]"
    )
    if result.baseline_first_token_seconds is not None:
        saved = result.baseline_first_token_seconds - result.first_token_seconds
        speedup = result.baseline_first_token_seconds / max(result.first_token_seconds, 1e-9)
        if result.baseline_identical:
            same = "identical"
        elif result.level == "lossless":
            same = "DIFFERENT (a lossless cache should not differ: please report this)"
        else:
            same = f"differs from the uncached run after the {result.level!r} level's rounding"
        err_console.print(
            f"from the text (no cache): first token after {result.baseline_first_token_seconds:.2f} s"
            f" -> the .kvz saved {saved:.2f} s ({speedup:.1f}x faster to first token); "
            f"output {same}"
        )


def _generate_url(
    url: str, prompt: str, max_new_tokens: int, model: str | None, level: str | None,
    compare: bool, deadline: float | None, limits: api.DownloadLimits, json_out: bool, quiet: bool,
    device: str | None, model_dtype: str | None,
) -> None:
    if compare:
        raise InputError("--compare needs a local .kvz file (it re-reads the text from the cache)")
    with status("loading model…", not quiet):
        km = api.load_model(model, device=device, model_dtype=model_dtype)
    with progress_bars(not quiet) as progress:
        result = api.generate_url(
            url, prompt, model=km, max_new_tokens=max_new_tokens, deadline=deadline,
            level=level, limits=limits, progress=progress,
        )
    if json_out:
        out_console.print_json(data=result.to_json())
        return
    out_console.print(result.text.strip(), highlight=False, markup=False)
    met = "" if result.deadline_met is None else (
        f", deadline {result.deadline:.2f} s {'met' if result.deadline_met else 'MISSED'}"
    )
    err_console.print(
        f"[dim]context of {result.cached_tokens} tokens ready after "
        f"{result.context_ready_seconds:.2f} s{met}; first token after "
        f"{result.first_token_seconds:.2f} s (manifest {result.manifest_seconds:.2f}, network "
        f"{result.network_seconds:.2f}, decode {result.decode_seconds:.2f}, recompute "
        f"{result.recompute_seconds:.2f}, prompt + first token "
        f"{result.prompt_and_first_token_seconds:.2f}); {result.bytes_fetched} bytes[/]\n"
        f"[dim]levels per chunk: {', '.join(result.levels)}[/]"
    )
    fetched = [p for p in result.profiles if p.fetched]
    if fetched:
        from kvzip.cli.fetch import profile_lines

        for line in profile_lines(fetched):
            err_console.print(f"{line} in {result.profile_seconds:.2f} s", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
