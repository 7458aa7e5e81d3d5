"""``kvzip store info|verify|gc``: look after a passage store."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from kvzip.cli.console import err_console, human_bytes, out_console, progress_bars
from kvzip.cli.errors import handle_errors
from kvzip.errors import ChecksumError
from kvzip.store import PassageStore
from kvzip.store.store import DEFAULT_GC_GRACE_S

store_app = typer.Typer(help="Inspect, check and clean a passage store.", no_args_is_help=True)


@handle_errors
def info_command(
    store: Path = typer.Argument(..., help="A store directory."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Documents, passages and stored caches per model and level."""
    with PassageStore(store) as passage_store:
        data = passage_store.info()
    if json_out:
        out_console.print_json(data=data)
        return
    out_console.print(
        f"{data['store']}: {data['documents']} documents, {data['passages']} passages "
        f"({data['passage_tokens']} tokens), {data['passages_without_cache']} without a cache\n"
        f"artifacts at {data['artifacts_url']}: {human_bytes(data['artifact_bytes'])}; "
        f"index {human_bytes(data['index_bytes'])}",
        highlight=False,
    )
    table = Table(title="caches", title_justify="left")
    for col in ("model", "level", "dtype", "artifacts", "tokens", "size", "per passage"):
        table.add_column(col, justify="left" if col in ("model", "level", "dtype") else "right")
    for c in data["caches"]:
        table.add_row(
            c["model"], c["level"], c["dtype"], str(c["artifacts"]), str(c["tokens"]),
            human_bytes(c["bytes"]), human_bytes(c["bytes"] / max(c["artifacts"], 1)),
        )
    out_console.print(table)


@handle_errors
def verify_command(
    store: Path = typer.Argument(..., help="A store directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Check that every indexed artifact exists, passes its checksums, decodes and matches its row."""
    with PassageStore(store) as passage_store, progress_bars(not quiet) as progress:
        report = passage_store.verify(progress)
    extra = f"; {report.unindexed} unindexed and {report.unreferenced} unreferenced (run `kvzip store gc`)"
    if report.ok:
        out_console.print(f"OK {store}: {report.checked} artifacts verified{extra if report.unindexed or report.unreferenced else ''}")
        return
    for problem in report.problems:
        out_console.print(f"  {problem}", highlight=False, markup=False)
    raise ChecksumError(f"{store}: {len(report.problems)} problem(s) in {report.checked} artifacts")


@handle_errors
def gc_command(
    store: Path = typer.Argument(..., help="A store directory."),
    grace: float = typer.Option(DEFAULT_GC_GRACE_S, "--grace", help="Seconds an unrecorded file is left alone (a running precache may be about to record it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would go."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Remove dangling index rows, artifacts no passage uses, orphan files and stale temporaries."""
    with PassageStore(store) as passage_store:
        report = passage_store.gc(grace_seconds=grace, dry_run=dry_run)
    if json_out:
        out_console.print_json(data=asdict(report))
        return
    verb = "would remove" if dry_run else "removed"
    err_console.print(
        f"{verb} {len(report.dangling_rows)} dangling rows, {len(report.unreferenced)} unreferenced "
        f"artifacts, {len(report.orphan_files)} orphan files, {len(report.temporaries)} temporaries "
        f"({human_bytes(report.freed_bytes)})",
        highlight=False,
    )


store_app.command("info")(info_command)
store_app.command("verify")(verify_command)
store_app.command("gc")(gc_command)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
