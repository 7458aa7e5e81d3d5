"""``kvzip bench``: the quality protocol (DESIGN.md) on real texts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from kvzip import bench
from kvzip.api import DEFAULT_CHUNK_TOKENS, load_model
from kvzip.cli.console import err_console, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.codecs import LEVELS, codec_ids


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: list[bench.BenchRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("text", "method", "bits/elem", "KL nats/tok", "Δppl %", "top-1",
                "enc Melem/s", "dec Melem/s", "TTFT .kvz s", "TTFT prefill s"):
        table.add_column(col, justify="left" if col in ("text", "method") else "right")
    for r in rows:
        table.add_row(
            r.text, r.method, f"{r.bits_per_element:.3f}", f"{r.kl:.5f}", f"{r.dppl_pct:+.2f}",
            f"{r.top1:.3f}", _fmt(r.encode_meps, ".1f"), _fmt(r.decode_meps, ".1f"),
            _fmt(r.ttft_kvz_s, ".3f"), f"{r.ttft_prefill_s:.2f}",
        )
    return table


@handle_errors
def bench_command(
    texts: list[Path] = typer.Argument(None, help="Text files (default: licenses and Python sources on this machine)."),
    levels: str = typer.Option(None, "--levels", help="Comma-separated kvzip levels (default: all)."),
    codecs: str = typer.Option(None, "--codecs", help="Comma-separated reference codec ids (default: cachegen)."),
    prefix: int = typer.Option(2048, "--prefix", help="Tokens prefilled and compressed."),
    cont: int = typer.Option(384, "--cont", help="Tokens teacher-forced after the prefix."),
    chunk_tokens: int = typer.Option(DEFAULT_CHUNK_TOKENS, "--chunk-tokens", help="Tokens per chunk."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the fp16, zstd and KIVI rows."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: embedded SmolLM2-135M-Instruct)."),
    json_out: bool = typer.Option(False, "--json", help="Print rows and means as JSON on stdout."),
    plot: Path = typer.Option(None, "--plot", help="Write a rate–quality chart (PNG)."),
    per_text: bool = typer.Option(False, "--per-text", help="Also print a row per text."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Measure size, quality (KL, Δppl, top-1), throughput and time to first token per level and codec."""
    config = bench.BenchConfig(
        texts=texts or bench.default_texts(),
        levels=_split(levels) or [name for name in LEVELS if name != "lossless"],
        codecs=_split(codecs) if codecs is not None else [c for c in bench.DEFAULT_CODECS if c in codec_ids()],
        prefix=prefix,
        cont=cont,
        chunk_tokens=chunk_tokens,
        baselines=not no_baselines,
    )
    with status("loading model…", not quiet):
        km = load_model(model)
    with progress_bars(not quiet) as progress:
        rows = bench.run_bench(km, config, progress)
    means = bench.summarize(rows)
    title = (
        f"{km.name}: prefix {prefix}, continuation {cont}, chunk {chunk_tokens} tokens, "
        f"{len({r.text for r in rows})} texts"
    )
    if plot is not None:
        bench.plot(means, plot, title)
        err_console.print(f"wrote {plot}")
    if json_out:
        out_console.print_json(json.dumps({
            "config": {"model": km.name, "prefix": prefix, "cont": cont, "chunk_tokens": chunk_tokens,
                       "texts": sorted({r.text for r in rows})},
            "rows": bench.rows_to_json(rows), "means": bench.rows_to_json(means),
        }))
        return
    if per_text:
        out_console.print(_table(rows, "per text"))
    out_console.print(_table(means, title))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
