"""``kvzip generate``: attach a .kvz to its model and continue."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import err_console, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors


@handle_errors
def generate_command(
    file: Path = typer.Argument(..., help="A .kvz file."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text that follows the cached document (a question, for --chat files)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    model: str = typer.Option(None, "--model", "-m", help="The model that wrote the file (default: embedded SmolLM2-135M-Instruct)."),
    level: str = typer.Option(None, "--level", "-l", help="Level to decode (default: the file's best)."),
    compare: bool = typer.Option(False, "--compare", help="Also generate from the text with no cache, and report the time saved."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Attach the cached document to the model and generate after PROMPT (greedy)."""
    with status("loading model…", not quiet):
        km = api.load_model(model)
    with progress_bars(not quiet) as progress:
        result = api.generate(
            file, prompt, model=km, max_new_tokens=max_new_tokens, level=level,
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
        same = "identical" if result.baseline_identical else "DIFFERENT"
        err_console.print(
            f"from the text (no cache): first token after {result.baseline_first_token_seconds:.2f} s"
            f" -> the .kvz saved {saved:.2f} s ({speedup:.1f}x faster to first token); "
            f"output {same}"
        )


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
