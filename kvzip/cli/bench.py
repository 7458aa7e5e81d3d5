"""``kvzip bench``: the quality protocol (DESIGN.md) on real texts, the rate sweep and the speed section."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from kvzip.api import load_model
from kvzip.cli.console import err_console, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import device_option, model_dtype_option
from kvzip.codecs import codec_ids
from kvzip.errors import InputError
from kvzip.levels import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_LEVEL,
    LEVELS,
    UNCALIBRATED_IMPORTANCE,
    chunk_span,
    is_calibrated,
)

if TYPE_CHECKING:  # the bench (and torch) load when it runs
    from kvzip import bench


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def _lengths(value: str | None) -> list[int]:
    out = []
    for x in _split(value) or []:
        try:
            n = int(x.lower().removesuffix("k")) * (1024 if x.lower().endswith("k") else 1)
        except ValueError:
            raise InputError(f"--lengths takes comma-separated token counts (e.g. 2048,4096,8192), got {x!r}") from None
        if n < 2:
            raise InputError(f"--lengths must be at least 2 tokens each, got {n}")
        out.append(n)
    return out


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


def _sweep_table(points: list[bench.SweepPoint], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("curve", "setting", "bits/elem", "KL nats/tok", "Δppl %", "top-1"):
        table.add_column(col, justify="left" if col == "curve" else "right")
    for p in sorted(points, key=lambda p: (p.curve, -p.bits_per_element)):
        table.add_row(p.curve, p.label, f"{p.bits_per_element:.3f}", f"{p.kl:.5f}",
                      f"{p.dppl_pct:+.2f}", f"{p.top1:.3f}")
    return table


def _speed_table(rows: list[bench.SpeedRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("tokens", "level", "bits/elem", "enc Melem/s", "dec Melem/s", "dec warm",
                "decoders", "peak MB", "fp32 MB", "peak/fp32", "TTFT .kvz s", "TTFT prefill s", "speedup"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for r in rows:
        table.add_row(
            str(r.tokens), r.level, f"{r.bits_per_element:.3f}", f"{r.encode_meps:.1f}",
            f"{r.decode_meps:.1f}", f"{r.decode_warm_meps:.1f}", str(r.decoders),
            f"{r.peak_decode_bytes / 2**20:.1f}", f"{r.cache_fp32_bytes / 2**20:.1f}",
            f"{r.peak_ratio:.2f}", f"{r.ttft_kvz_s:.3f}", f"{r.ttft_prefill_s:.2f}",
            f"{r.ttft_speedup:.1f}×",
        )
    return table


def _profile_line(report: bench.ProfileReport) -> str:
    parts = []
    for level, be in report.break_even.items():
        tokens = be["break_even_tokens"]
        parts.append(f"{level} {tokens:,} tokens" if isinstance(tokens, int) else f"{level} none")
    even = "; break-even against the uncalibrated level: " + ", ".join(parts) if parts else ""
    return f"profile {report.digest[:12]}: {report.bytes:,} bytes{even}"


def _importance_table(rows: list[bench.ImportanceRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("text", "method", "kept", "bits/stored elem", "bits/context elem", "KL nats/tok", "Δppl %", "top-1"):
        table.add_column(col, justify="left" if col in ("text", "method") else "right")
    for r in rows:
        table.add_row(r.text, r.method, f"{r.kept_fraction:.3f}", f"{r.bits_per_element:.3f}",
                      f"{r.bits_per_context_element:.3f}", f"{r.kl:.5f}", f"{r.dppl_pct:+.2f}", f"{r.top1:.3f}")
    return table


def _fractions(value: str | None) -> list[float]:
    out = []
    for x in _split(value) or []:
        try:
            out.append(float(x))
        except ValueError:
            raise InputError(f"--keep takes comma-separated fractions (e.g. 0.9,0.5), got {x!r}") from None
    return out


@handle_errors
def bench_command(
    texts: list[Path] = typer.Argument(None, help="Text files (default: licenses and Python sources on this machine)."),
    levels: str = typer.Option(None, "--levels", help="Comma-separated kvzip levels (default: all)."),
    codecs: str = typer.Option(None, "--codecs", help="Comma-separated reference codec ids (default: cachegen)."),
    prefix: int = typer.Option(2048, "--prefix", help="Tokens prefilled and compressed."),
    cont: int = typer.Option(384, "--cont", help="Tokens teacher-forced after the prefix."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help=f"Tokens per chunk (default: {DEFAULT_CHUNK_TOKENS}; the --keep F rows about {DEFAULT_CHUNK_TOKENS}/F, as kvzip encode --keep)."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the fp16, zstd and KIVI rows."),
    profile: str = typer.Option(None, "--profile", help="Calibration profile FILE or DIGEST (default: the newest for the model)."),
    if_no_profile: str = typer.Option("calibrate", "--if-no-profile", help="Without a profile: calibrate | uncalibrated | error."),
    uniform: bool = typer.Option(False, "--uniform", help=f"Code the lossy levels at uniform precision: the calibrated ones even where the profile has them spend bits by importance (kvzip calibrate --importance-above), the uncalibrated ones instead of by {UNCALIBRATED_IMPORTANCE} importance."),
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="Also rows LEVEL-uncal with the uncalibrated codecs (and their sweep curve)."),
    sweep: bool = typer.Option(False, "--sweep", help="Trace each method's rate–quality curve (kvzip step, cachegen bins, KIVI bits)."),
    lengths: str = typer.Option(None, "--lengths", help="Speed section at these context lengths, e.g. 2048,4096,8192."),
    speed_level: str = typer.Option(DEFAULT_LEVEL, "--speed-level", help="Level the speed section encodes."),
    speed_only: bool = typer.Option(False, "--speed-only", help="Only the speed section (needs --lengths)."),
    importance: str = typer.Option(None, "--importance", help="Importance section: comma-separated scorers (reconstruct, prefill, keynorm); each level with its steps weighted by each scorer, and with --keep, its entries dropped by it."),
    keep: str = typer.Option(None, "--keep", help="With --importance: comma-separated fractions of entries kept, e.g. 0.9,0.7,0.5,0.3."),
    keep_rule: str = typer.Option("shared", "--keep-rule", help="With --keep: comma-separated budget rules (shared, head)."),
    keep_weigh: bool = typer.Option(False, "--keep-weigh", help="With --keep: each keep row also with the kept entries' steps weighted by importance (as kvzip encode --keep F --importance SCORER)."),
    model: str = typer.Option(None, "--model", "-m", help="Model (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    json_out: bool = typer.Option(False, "--json", help="Print rows, means, sweep, speed and profile as JSON on stdout."),
    plot: Path = typer.Option(None, "--plot", help="Write a rate–quality chart (PNG); with --sweep, one curve per method."),
    per_text: bool = typer.Option(False, "--per-text", help="Also print a row per text."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Measure size, quality (KL, Δppl, top-1), throughput and time to first token per level and codec."""
    from kvzip import bench

    config = bench.BenchConfig(
        texts=texts or bench.default_texts(),
        levels=_split(levels) or [name for name in LEVELS if name != "lossless"],
        codecs=_split(codecs) if codecs is not None else [c for c in bench.DEFAULT_CODECS if c in codec_ids()],
        prefix=prefix,
        cont=cont,
        chunk_tokens=chunk_tokens,
        baselines=not no_baselines,
        profile=profile,
        if_no_profile=if_no_profile,
        uncalibrated=uncalibrated,
        sweep=sweep,
        quality=not speed_only,
        lengths=_lengths(lengths),
        speed_level=speed_level,
        scorers=_split(importance) or [],
        keeps=_fractions(keep),
        keep_rules=_split(keep_rule) or ["shared"],
        keep_weigh=keep_weigh,
        uniform=uniform,
    )
    if config.keeps and not config.scorers:
        raise InputError("--keep is part of the importance section: give --importance SCORERS")
    if keep_weigh and not config.keeps:
        raise InputError("--keep-weigh weighs the --keep rows: give --keep FRACTIONS")
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise InputError(f"--chunk-tokens must be positive, got {chunk_tokens}")
    if plot is not None and speed_only:
        raise InputError("--plot draws the quality rows; drop --speed-only")
    with status("loading model…", not quiet):
        km = load_model(model, device=device, model_dtype=model_dtype)
    with progress_bars(not quiet) as progress:
        result = bench.run_bench(km, config, progress)
    rows = result.rows
    means = bench.summarize(rows)
    sweep_means = bench.summarize_sweep(result.sweep)
    importance_means = bench.summarize_importance(result.importance)
    span, spans = chunk_span(chunk_tokens), {f: chunk_span(chunk_tokens, f) for f in config.keeps}
    wider = "".join(f" ({n} at --keep {f:g})" for f, n in spans.items() if n != span)
    title = f"{km.name}: prefix {prefix}, continuation {cont}, chunk {span} tokens{wider}, {len(result.texts)} texts"
    if result.profile is not None:
        title += f", profile {result.profile.digest[:12]}"
        if result.profile.importance:
            title += f" (calibrated levels by {result.profile.importance} importance)"
    uncal_by = None if uniform else UNCALIBRATED_IMPORTANCE
    if uncal_by and (result.profile is None or uncalibrated):
        title += f" (uncalibrated levels by {uncal_by} importance)"
    if plot is not None:
        bench.plot(means, plot, title, sweep_means)
        err_console.print(f"wrote {plot}")
    if json_out:
        out_console.print_json(json.dumps({
            "config": {"model": km.name, "prefix": prefix, "cont": cont, "chunk_tokens": span,
                       "keep_chunk_tokens": {f"{f:g}": n for f, n in spans.items()},
                       "uncalibrated_importance": uncal_by,
                       "texts": sorted(result.texts), "speed_texts": result.speed_texts,
                       "lengths": list(config.lengths), "speed_level": speed_level},
            "profile": None if result.profile is None else asdict(result.profile),
            "rows": bench.rows_to_json(rows), "means": bench.rows_to_json(means),
            "sweep": {"points": bench.rows_to_json(result.sweep), "means": bench.rows_to_json(sweep_means)},
            "speed": bench.rows_to_json(result.speed),
            "importance": {"rows": bench.rows_to_json(result.importance),
                           "means": bench.rows_to_json(importance_means)},
        }))
        return
    if per_text and rows:
        out_console.print(_table(rows, "per text"))
    if means:
        out_console.print(_table(means, title))
    if importance_means:
        if per_text:
            out_console.print(_importance_table(result.importance, "importance and dropping, per text"))
        out_console.print(_importance_table(
            importance_means, f"importance and dropping (means over {len(result.texts)} texts; "
            "kept: entries stored / entries the cache held)"))
    if sweep_means:
        out_console.print(_sweep_table(sweep_means, f"rate–quality sweep (means over {len(result.texts)} texts)"))
    if result.speed:
        out_console.print(_speed_table(
            result.speed, f"{km.name}: speed, level {speed_level}, chunk {chunk_tokens} tokens "
            "(decode cold: empty model caches; decoders are threads of this process; "
            "peak: RSS high-water of the process)"))
    if result.profile is not None:
        out_console.print(_profile_line(result.profile))
    elif any(name in LEVELS and is_calibrated(name) for name in config.levels):
        out_console.print("no calibration profile: the levels ran uncalibrated")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
