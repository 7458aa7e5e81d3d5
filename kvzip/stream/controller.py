"""The adaptive controller: which quality level to fetch for the next chunk.

CacheGen's rule (Liu et al., SIGCOMM'24, §5.3): before each chunk, take the
throughput measured so far and the time left before the deadline, and pick the
best level at which *all remaining chunks* would still arrive in time; when even
the smallest level cannot, send the chunk as text and let the model recompute
it.  Planning for the whole remainder, not just the next chunk, is what keeps
an early fast chunk from eating the budget of the later ones.

Everything here is pure (numbers in, a decision out) so it is unit-tested
without a network; :mod:`kvzip.stream.client` feeds it real measurements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """What to do with the next chunk: fetch ``level``, or recompute (``level`` is None)."""

    level: str | None
    # Predicted seconds to fetch the remaining chunks at ``level`` (at the smallest
    # level when recomputing): what the rule compared against the time left.
    predicted_seconds: float

    @property
    def recompute(self) -> bool:
        return self.level is None


def rank_levels(chunk_sizes: Sequence[Mapping[str, int]]) -> list[str]:
    """Level names best first, taking the bigger total payload as the better quality.

    Every kvzip level trades bytes for fidelity, so size orders them without
    the controller knowing any codec (the same rule picks a file's default level).
    """
    if not chunk_sizes:
        return []
    totals = {name: sum(sizes[name] for sizes in chunk_sizes) for name in chunk_sizes[0]}
    return sorted(totals, key=lambda name: totals[name], reverse=True)


def choose_level(
    remaining: Sequence[Mapping[str, int]],
    levels: Sequence[str],
    bytes_per_second: float,
    seconds_left: float,
    recompute_seconds: float | None = None,
) -> Decision:
    """Decide the first chunk of ``remaining`` (payload bytes per level for each chunk left).

    ``levels`` lists the levels the client may use, best first; an empty list
    means recompute everything.  A level qualifies when the bytes of every
    remaining chunk at that level, at ``bytes_per_second``, fit in ``seconds_left``.

    When none does, CacheGen recomputes.  That assumes recomputing is cheap (a
    GPU); on a CPU it can be far slower than any transfer, so once the caller
    knows ``recompute_seconds`` (its estimate for recomputing the remaining
    chunks) and that is slower than fetching them at the smallest level, the
    smallest level is fetched instead: the deadline is missed either way, by less.
    """
    if not remaining:
        raise ValueError("no chunk left to decide")
    if bytes_per_second <= 0:
        raise ValueError(f"throughput must be positive, got {bytes_per_second}")
    predicted = 0.0
    for level in levels:
        predicted = sum(sizes[level] for sizes in remaining) / bytes_per_second
        if predicted <= seconds_left:
            return Decision(level, predicted)
    if levels and recompute_seconds is not None and recompute_seconds > predicted:
        return Decision(levels[-1], predicted)
    return Decision(None, predicted)


class ThroughputMeter:
    """An exponentially weighted mean of measured transfer rates, in bytes per second.

    CacheGen uses the last chunk's throughput; a little smoothing keeps one
    stalled or unusually quick request from swinging the next decision.
    """

    def __init__(self, initial_bytes_per_second: float, weight: float = 0.5):
        if initial_bytes_per_second <= 0:
            raise ValueError(f"throughput must be positive, got {initial_bytes_per_second}")
        self.bytes_per_second = float(initial_bytes_per_second)
        self._weight = weight

    def add(self, nbytes: int, seconds: float) -> None:
        """Record one transfer of ``nbytes`` that took ``seconds``."""
        rate = nbytes / max(seconds, 1e-6)
        self.bytes_per_second += self._weight * (rate - self.bytes_per_second)
