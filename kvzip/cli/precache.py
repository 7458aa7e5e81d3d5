"""``kvzip precache``: documents -> passages -> one cached artifact per passage in a store."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip import api
from kvzip import importance as scoring
from kvzip.cli.console import err_console, human_bytes, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import device_option, keep_by_option, keep_option, keep_rule_option, model_dtype_option
from kvzip.store import DEFAULT_PASSAGE_TOKENS, ENGINES, PassageStore, check_level, precache


@handle_errors
def precache_command(
    docs: list[Path] = typer.Argument(..., help="Text files, directories (read recursively) and .jsonl files ({\"id\", \"text\"} per line)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store directory (created if missing): index.sqlite and, by default, artifacts/."),
    passage_tokens: int = typer.Option(None, "--passage-tokens", show_default=False, help=f"Most tokens per passage (cuts prefer paragraph, then sentence ends). Default {DEFAULT_PASSAGE_TOKENS}, or what a sliding-window layer keeps when that is less."),
    level: str = typer.Option(None, "--level", "-l", help="Quality level of the stored caches (default: balanced, or lossless where no lossy level exists)."),
    model: str = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    artifacts: str = typer.Option(None, "--artifacts", help="Where artifacts live, as an fsspec URL (s3://bucket/prefix, file:///path); remembered by the store."),
    engine: str = typer.Option("local", "--engine", help=f"Run passages here or as Ray tasks ({', '.join(ENGINES)})."),
    profile: str = typer.Option(None, "--profile", help="Calibration profile (.kvzprofile file or digest) for a lossy level (default: the newest one for the model)."),
    if_no_profile: str = typer.Option("calibrate", "--if-no-profile", help="When the model has no profile yet: calibrate, uncalibrated or error."),
    importance: str = typer.Option(None, "--importance", help="Score each passage's entries (reconstruct | prefill | keynorm) and spend the lossy level's bits by importance, as encode --importance does; none: uniform precision (default: as the model's calibration profile says; without a profile, prefill; with --keep, the scorer it drops by)."),
    keep: float = keep_option(),
    keep_by: str = keep_by_option(),
    keep_rule: str = keep_rule_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Split documents into passages, prefill each once on its own, and store its cache."""
    level = check_level(level)
    scoring.check_options(importance, keep, keep_rule, keep_by)  # before the model loads
    with PassageStore(store, artifacts=artifacts, create=True) as passage_store:
        with status("loading model…", not quiet):
            km = api.load_model(model, device=device, model_dtype=model_dtype)
        with progress_bars(not quiet) as progress:
            summary = precache(
                docs, passage_store, km, passage_tokens=passage_tokens, level=level,
                engine=engine, profile=profile, if_no_profile=if_no_profile, importance=importance,
                keep=keep, keep_rule=keep_rule, keep_by=keep_by, progress=progress,
            )
    if json_out:
        out_console.print_json(data=summary.to_json())
        return
    weighed = f", bits spent by importance ({summary.importance})" if summary.importance else ""
    err_console.print(
        f"[bold green]{summary.store}[/]: {summary.documents} documents, {summary.passages} passages "
        f"({summary.unique_passages} distinct), level {summary.level}{weighed}\n"
        f"  cached now {summary.cached} ({summary.cached_tokens} tokens, "
        f"{human_bytes(summary.written_bytes)}) at {summary.passages_per_second:.2f} passages/s; "
        f"already there {summary.already_cached}, recovered {summary.adopted}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("precache")(precache_command)
