"""Options several commands share, with the one function that applies each."""

from __future__ import annotations

import typer

from kvzip.formats.limits import ENV_MAX_MEMORY, parse_size, set_memory_limit


def max_memory_option() -> str | None:
    return typer.Option(
        None, "--max-memory", metavar="SIZE",
        help=f"Most memory decoding may take, e.g. 8G or 512M (default: ${ENV_MAX_MEMORY}, "
        "else half of this machine's RAM); a file that needs more is refused before anything "
        "is allocated.",
    )


def apply_max_memory(value: str | None) -> None:
    """Set the decode memory limit of this process from ``--max-memory`` (None: the default)."""
    set_memory_limit(None if value is None else parse_size(value))


def device_option() -> str | None:
    return typer.Option(
        None, "--device", metavar="DEVICE",
        help="Where the model runs: auto (an accelerator when torch sees one, else the CPU), "
        "cpu, cuda, cuda:N or mps.",
    )


def model_dtype_option() -> str | None:
    return typer.Option(
        None, "--model-dtype", metavar="DTYPE",
        help="The model's weights: float32, bfloat16 or float16 (default: float32 on the CPU, "
        "bfloat16 on an accelerator); independent of the dtype a .kvz stores.",
    )


def keep_option() -> float | None:
    return typer.Option(
        None, "--keep",
        help="Drop entries: keep this fraction (0-1] of them by importance score; attention sinks "
        "and the last position always kept. The same scores spend the lossy level's bits on "
        "what is kept (--importance none: uniform precision).",
    )


def keep_by_option() -> str | None:
    return typer.Option(
        None, "--keep-by",
        help="The scorer --keep drops by (reconstruct | prefill | keynorm; default: --importance's, "
        "else reconstruct).",
    )


def keep_rule_option() -> str:
    return typer.Option(
        "shared", "--keep-rule",
        help="How --keep spreads its budget: shared (one budget across heads and layers, by score) "
        "or head (the same fraction in every head).",
    )
