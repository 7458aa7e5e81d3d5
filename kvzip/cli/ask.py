"""``kvzip ask``: retrieve passages from a store, attach their caches, answer."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import err_console, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import apply_max_memory, device_option, max_memory_option, model_dtype_option
from kvzip.store import PassageStore, ask


@handle_errors
def ask_command(
    question: str = typer.Argument(..., help="The question."),
    store: Path = typer.Option(..., "--store", "-s", help="A store made by `kvzip precache`."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Passages to retrieve (BM25)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    blend_recompute: float = typer.Option(0.0, "--blend-recompute", help="Share of each passage's first tokens to recompute with the real preceding context (0-1; CacheBlend-style)."),
    recompute_window: bool = typer.Option(False, "--recompute-window", help="Sliding-window models: recompute the sliding layers' last window from the text instead of moving the passages' keys there."),
    level: str = typer.Option(None, "--level", "-l", help="Level of the caches to use (default: the store's)."),
    model: str = typer.Option(None, "--model", "-m", help="The model the store was filled with (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also time a full prefill of the same prompt."),
    keep: float = typer.Option(None, "--keep", help="Use the passages' caches stored with precache --keep F (default: each passage's cache that keeps every entry, spending bits by importance where it was stored both ways)."),
    importance: str = typer.Option(None, "--importance", help="Use the passages' caches stored with precache --importance SCORER (none: the uniform ones)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    max_memory: str = max_memory_option(),
) -> None:
    """Answer QUESTION from the store's best passages, reusing their caches (greedy)."""
    apply_max_memory(max_memory)
    with PassageStore(store) as passage_store:
        with status("loading model…", not quiet):
            km = api.load_model(model, device=device, model_dtype=model_dtype)
        with progress_bars(not quiet) as progress:
            result = ask(
                passage_store, question, km, top_k=top_k, max_new_tokens=max_new_tokens,
                level=level, blend_recompute=blend_recompute, recompute_window=recompute_window,
                compare=compare, keep=keep, importance=importance, progress=progress,
            )
    if json_out:
        out_console.print_json(data={**asdict(result), "speedup": result.speedup})
        return
    out_console.print(result.answer.strip(), highlight=False, markup=False)
    err_console.print("[bold]sources[/]", highlight=False)
    for s in result.sources:
        where = s.doc_key if s.doc_key == s.source else f"{s.doc_key} ({s.source})"
        err_console.print(f"  {where} passage {s.passage} ({s.tokens} tokens, bm25 {-s.bm25:.2f})", highlight=False, markup=False)
    err_console.print(
        f"[dim]{result.context_tokens} context + {result.prompt_tokens} prompt tokens, level "
        f"{result.level}, recompute {result.blend_recompute:g}: fetch {result.fetch_seconds:.2f} s, "
        f"assemble {result.assemble_seconds:.2f} s (opening from {result.opening_source or 'nowhere'}), "
        f"first token after {result.first_token_seconds:.2f} s"
        + (" — the model read the context itself, sooner than its caches decode" if result.context_source == "recompute" else "")
        + "[/]"
    )
    if result.baseline_first_token_seconds is not None:
        same = "identical" if result.baseline_identical else "different"
        err_console.print(
            f"full prefill of the same prompt: first token after "
            f"{result.baseline_first_token_seconds:.2f} s -> {result.speedup:.1f}x faster; answer {same}"
        )


def register(app: typer.Typer) -> None:
    app.command("ask")(ask_command)
