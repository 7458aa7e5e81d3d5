"""``kvzip info``: what a .kvz holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvzip import api
from kvzip.cli.console import human_bytes, out_console
from kvzip.cli.errors import handle_errors


@handle_errors
def info_command(
    file: Path = typer.Argument(..., help="A .kvz file."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a .kvz file's header, model, tokens, chunks, levels and sizes."""
    data = api.info(file)
    if json_out:
        out_console.print_json(data=data)
        return
    model = data["model"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("file", data["path"]),
        ("format", f".kvz v{data['format_version']} (kvzip {data['kvzip_version']})"),
        ("model", f"{model.get('name')} [{model.get('architecture')}]"),
        ("fingerprint", model["fingerprint"][:16] + "…"),
        ("geometry", f"{data['num_layers']} layers × {data['kv_heads']} kv heads × head_dim {data['head_dim']}, {data['dtype']}"),
        ("tokens", f"{data['tokens']} in {data['chunks']} chunks of ≤{data['chunk_tokens']}"),
        ("chat turn", "yes" if data["chat"] else "no"),
        ("raw cache", human_bytes(data["raw_bytes"])),
        ("file", f"{human_bytes(data['file_bytes'])}  ratio {data['ratio']:.2f}x, {data['bits_per_element']:.3f} bits/element"),
    ]
    layout = data["layout"]
    keep = data.get("keep")
    if keep:
        scored, held = keep.get("entries_scored") or 0, keep.get("entries_kept") or 0
        heads = "a layer's heads together" if keep.get("heads") == "layer" else "each head its own"
        rows.insert(6, ("kept", f"{held / max(scored, 1):.1%} of {scored} entries (--keep {keep.get('fraction'):g}, "
                                f"by {keep.get('scorer')}, {keep.get('rule')} budget, {heads}); "
                                f"{data['bits_per_context_element']:.3f} bits per context element, "
                                f"{data['file_bytes'] / data['tokens']:.0f} bytes per token"))
    elif not layout["dense"]:
        kept = ", ".join(f"{g['layers']} {g['type'].replace('_attention', '')} "
                         f"{'layers keep' if g['layers'] != 1 else 'layer keeps'} {g['tokens_stored']}"
                         for g in layout["by_type"])
        rows.insert(6, ("stored", f"{kept} (of {data['tokens']}); "
                                  f"{data['bits_per_context_element']:.3f} bits per context element, "
                                  f"{data['file_bytes'] / data['tokens']:.0f} bytes per token"))
    imp = data.get("importance")
    if imp:
        parts = ", ".join(f"{share:.0%} at ×{factor:g}" for share, factor in
                          zip(imp.get("shares", []), imp.get("factors", [])))
        unit = "each layer's positions (all its heads)" if imp.get("heads") == "layer" else "each head's entries"
        rows.append(("importance", f"{imp.get('scorer')}: {unit} {parts} of the level's step"))
        for level in data["levels"]:
            classes = level.get("importance_classes")
            if classes:
                split = ", ".join(f"×{c['step_factor']:g}: {c['share']:.0%} of elements at "
                                  f"{c['bits_per_element']:.2f} bits" for c in classes if c["elements"])
                rows.append((f"bits by class ({level['name']})", split))
    if data.get("source"):
        rows.append(("source", data["source"]["name"]))
    prof = data.get("profile")
    if prof:
        where = (f"here, {human_bytes(prof['bytes'])}" if prof.get("available")
                 else "NOT on this machine: decoding needs it (kvzip fetch gets it from a server)")
        rows.append(("profile", f"{prof['digest'][:16]}… ({where})"))
    for key, value in rows:
        table.add_row(key, value)
    out_console.print(table)
    levels = Table(title="levels", title_justify="left")
    cols = ["level", "codec", "payload", "bits/element"]
    if not layout["dense"]:
        cols.append("bits/context element")
    for col in (*cols, "ratio"):
        levels.add_column(col, justify="right" if col != "level" else "left")
    for lvl in data["levels"]:
        cells = [lvl["name"], lvl["codec"]["id"], human_bytes(lvl["payload_bytes"]), f"{lvl['bits_per_element']:.3f}"]
        if not layout["dense"]:
            cells.append(f"{lvl['bits_per_context_element']:.3f}")
        levels.add_row(*cells, f"{lvl['ratio']:.2f}x" if lvl["ratio"] else "-")
    out_console.print(levels)


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
