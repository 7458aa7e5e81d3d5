"""``kvzip calibrate`` and ``kvzip profiles``: build and list model calibration profiles."""

from __future__ import annotations

from pathlib import Path

import typer

from kvzip import api
from kvzip.cli.console import err_console, human_bytes, out_console, progress_bars, status
from kvzip.cli.errors import handle_errors
from kvzip.cli.options import device_option, model_dtype_option
from kvzip.errors import InputError
from kvzip.levels import list_profiles, profile_dirs, write_profile


@handle_errors
def calibrate_command(
    texts: list[Path] = typer.Argument(None, help="Calibration text files (default: a few licences and Python standard-library modules that kvzip bench does not score)."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the profile here (default: <profile dir>/<digest>.kvzprofile, where encode finds it)."),
    model: str = typer.Option(None, "--model", "-m", help="Model: local dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)."),
    device: str = device_option(),
    model_dtype: str = model_dtype_option(),
    key_weighting: str = typer.Option("query", "--key-weighting", help="query (weigh key error by query channel-pair energy) or mse."),
    value_weighting: str = typer.Option("output", "--value-weighting", help="output (weigh value error through o_proj) or mse."),
    basis: str = typer.Option("pca-layer", "--basis", help="pca-layer (one basis per layer across its kv heads), pca (one per kv head) or none."),
    allocation: str = typer.Option("sensitivity", "--allocation", help="sensitivity (step per K/V and layer from measured KL) or flat."),
    tokens_per_text: int = typer.Option(1024, "--tokens-per-text", help="Tokens read from each text."),
    importance_above: float = typer.Option(0.006, "--importance-above", help="When the calibrated balanced level's KL on the calibration texts (nats per token) is above this, the profile has the lossy levels spend bits by the attention each entry got during the prefill (encode --importance prefill); 0: always, a large value: never."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Measure a model's KV statistics and write a calibration profile for its lossy levels."""
    from kvzip.levels.calibrate import CalibrationOptions, calibrate, default_calibration_texts, read_texts

    paths = list(texts) if texts else default_calibration_texts()
    if not paths:
        raise InputError("no calibration texts given and none of the default ones exist here")
    contents = read_texts(paths)
    options = CalibrationOptions(key_weighting=key_weighting, value_weighting=value_weighting, basis=basis,
                                 allocation=allocation, tokens_per_text=tokens_per_text,
                                 importance_above=importance_above)
    options.check()
    with status("loading model…", not quiet):
        km = api.load_model(model, device=device, model_dtype=model_dtype)
    with progress_bars(not quiet) as progress:
        data, report = calibrate(km, contents, options, progress=progress)
    prof = write_profile(data, path=output)
    if json_out:
        out_console.print_json(data={"digest": prof.digest, "path": str(prof.path), "bytes": prof.size, **report})
        return
    err_console.print(
        f"[bold green]wrote[/] {prof.path}\n"
        f"  profile {prof.digest}\n"
        f"  {human_bytes(prof.size)}, {report['calibration_tokens']} calibration tokens from "
        f"{len(report['texts'])} texts, {report['seconds']:.1f} s\n"
        f"  {_quality_line(report['quality'])}",
        highlight=False,
    )
    if output is not None:
        err_console.print("  pass it to encode with --profile, or copy it into the profile directory "
                          f"({profile_dirs()[0]})", highlight=False)


def _quality_line(q: dict) -> str:
    """What the calibration's quality check measured and chose, in one line."""
    u = q["uniform"]
    line = f"{q['level']}: {u['mean_bits']:.2f} bits per element at KL {u['mean_kl']:.4f} on these texts"
    if q["importance"]:
        w = q[q["importance"]]
        return (line + f", above {q['bound']:g}: the lossy levels spend bits by {q['importance']} importance "
                f"({w['mean_bits']:.2f} bits at KL {w['mean_kl']:.4f})")
    if q.get("prefill"):
        return line + f", above {q['bound']:g}, but prefill importance did no better: uniform precision"
    return line + f" (bound {q['bound']:g}: uniform precision)"


@handle_errors
def profiles_command(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the calibration profiles in the profile directories (KVZIP_PROFILE_DIR)."""
    found = list_profiles()
    if json_out:
        out_console.print_json(data=[p.summary() for p in found])
        return
    if not found:
        err_console.print(f"no profiles in {', '.join(map(str, profile_dirs()))}", highlight=False)
        return
    for p in found:
        out_console.print(
            f"{p.digest[:16]}…  {p.meta.get('model_name', '?')}  model {p.model_fingerprint[:12]}…  "
            f"{human_bytes(p.size)}  {p.meta.get('created', '')}"
            + (f"  levels by {p.importance} importance" if p.importance else "") + f"  {p.path}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)
    app.command("profiles")(profiles_command)
