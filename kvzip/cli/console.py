"""Consoles and progress bars: stdout stays clean for data, everything else goes to stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STAGE_LABELS = {
    "prefill": "prefill (tokens)",
    "encode": "encode (chunks)",
    "decode": "decode (chunks)",
    "baseline": "baseline: generate from the text",
    "fetch": "fetch (bytes)",
    "stream": "stream (chunks)",
    "split": "split documents",
    "precache": "prefill + store passages",
    "calibrate: statistics": "calibrate: KV statistics (tokens)",
    "calibrate: sensitivity": "calibrate: layer sensitivity (probes)",
}


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column counts bytes)."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f}/s", style="progress.data.speed")


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator:
    """Yield a ``progress(stage, done, total)`` callback drawing one bar per stage on stderr."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    bars = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(STAGE_LABELS.get(stage, stage), total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr for a step without measurable progress (loading a model)."""
    if not enabled:
        yield
        return
    with err_console.status(message):
        yield


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
