"""The adaptive controller: which quality level to fetch for the next chunk.

CacheGen's rule (Liu et al., SIGCOMM'24, §5.3): before each chunk, take the
throughput measured so far and the time left before the deadline, and pick the
best level at which *all remaining chunks* would still be ready in time; when
even the cheapest level cannot, send the chunk as text and let the model
recompute it.  Planning for the whole remainder, not just the next chunk, is
what keeps an early fast chunk from eating the budget of the later ones.

"Ready" means fetched *and decoded*.  On a CPU decoding a lossy chunk can take
longer than fetching it, so each level's plan is a two-stage pipeline (the
network, then the decoder, one chunk after the other, decoding overlapping the
next download; :func:`pipeline_seconds`) with the transfer times at the
measured throughput and the decode times from :class:`DecodeMeter`: a
conservative prior per element, replaced by what each level's chunks actually
took to decode.

Everything here is pure (numbers in, a decision out) so it is unit-tested
without a network; :mod:`kvzip.stream.client` feeds it real measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Seconds to decode one K/V element before anything has been measured: 20 M elements/s,
# ~0.15 s for a 256-token chunk of SmolLM2-135M.  That is slower than every level decodes
# in one process on a quiet 2-core CPU (30-47 M/s, docs/benchmarks.md), so the first plans
# err towards cheaper levels, but not so slow that no level seems to fit a deadline the
# machine could meet (a level is only measured once it is chosen).
DEFAULT_DECODE_PRIOR = 5e-8


@dataclass(frozen=True)
class Decision:
    """What to do with the next chunk: fetch ``level``, or recompute (``level`` is None)."""

    level: str | None
    # Predicted seconds until the remaining chunks are ready (fetched and decoded) at
    # ``level`` (at the fastest level when recomputing): what the rule compared against
    # the time left.
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


def pipeline_seconds(
    transfer: Sequence[float], decode: Sequence[float], decoder_busy: float = 0.0
) -> float:
    """When the last of a run of chunks is decoded, from now.

    Chunk ``k`` crosses the network in ``transfer[k]`` seconds, right after chunk
    ``k - 1``; the decoder, free in ``decoder_busy`` seconds (chunks already
    fetched and not yet decoded), decodes it in ``decode[k]`` once both it has
    arrived and the chunk before is decoded.  That is roughly
    ``max(sum(transfer), decoder_busy + sum(decode))`` plus the other stage's
    tail: the first transfer when decoding is the bottleneck, the last decode
    when the network is.
    """
    if len(transfer) != len(decode):
        raise ValueError("one transfer time and one decode time per chunk")
    arrived, decoded = 0.0, max(0.0, decoder_busy)
    for fetch, work in zip(transfer, decode, strict=True):
        arrived += fetch
        decoded = max(decoded, arrived) + work
    return decoded


def choose_level(
    remaining: Sequence[Mapping[str, int]],
    levels: Sequence[str],
    bytes_per_second: float,
    seconds_left: float,
    recompute_seconds: float | None = None,
    *,
    decode_seconds: Mapping[str, Sequence[float]] | None = None,
    decoder_busy: float = 0.0,
) -> Decision:
    """Decide the first chunk of ``remaining`` (payload bytes per level for each chunk left).

    ``levels`` lists the levels the client may use, best first; an empty list
    means recompute everything.  ``bytes_per_second`` may be ``math.inf`` (no
    network cost).  ``decode_seconds[level][k]`` is the predicted decode time of
    remaining chunk ``k`` at ``level`` (None: decoding is free), and
    ``decoder_busy`` the decoder's backlog of chunks already fetched.  A level
    qualifies when every remaining chunk fetched and decoded at that level, as a
    pipeline (:func:`pipeline_seconds`), is ready within ``seconds_left``.

    When the caller knows ``recompute_seconds`` and recomputing would be ready sooner than
    the level picked (a small model on an accelerator, a slow link), it recomputes: the
    result is exact and earlier.

    When none does, CacheGen recomputes.  That assumes recomputing is cheap (a
    GPU); on a CPU it can be far slower than any transfer, so once the caller
    knows ``recompute_seconds`` (its estimate for recomputing the remaining
    chunks, after the decoder's backlog) and that is slower than the fastest
    level, the fastest level (the smaller of equals) is fetched instead: the
    deadline is missed either way, by less, and a level not measured yet gets
    its decode speed measured.
    """
    if not remaining:
        raise ValueError("no chunk left to decide")
    if not bytes_per_second > 0:
        raise ValueError(f"throughput must be positive, got {bytes_per_second}")
    predictions: dict[str, float] = {}
    recompute = None if recompute_seconds is None else decoder_busy + recompute_seconds
    for level in levels:
        transfer = [sizes[level] / bytes_per_second for sizes in remaining]
        decode = [0.0] * len(remaining) if decode_seconds is None else decode_seconds[level]
        predicted = pipeline_seconds(transfer, decode, decoder_busy)
        if predicted <= seconds_left:
            if recompute is not None and recompute <= min(predicted, seconds_left):
                return Decision(None, recompute)  # faster than fetching, and exact
            return Decision(level, predicted)
        predictions[level] = predicted
    if not predictions:
        return Decision(None, math.inf)
    fastest = min(reversed(predictions), key=lambda level: predictions[level])  # ties: smaller
    if recompute_seconds is not None and decoder_busy + recompute_seconds > predictions[fastest]:
        return Decision(fastest, predictions[fastest])
    return Decision(None, predictions[fastest])


class DecodeMeter:
    """Seconds per K/V element to decode each level: a conservative prior, then measured.

    A level not measured yet is assumed as slow as the prior or the slowest level
    measured so far, whichever is slower; once one of its chunks has been decoded
    it gets its own exponentially weighted mean (the first chunk, which may pay
    one-off costs, is soon outweighed).
    """

    def __init__(self, prior_seconds_per_element: float = DEFAULT_DECODE_PRIOR,
                 weight: float = 0.5):
        if not prior_seconds_per_element >= 0:
            raise ValueError(f"a decode prior cannot be negative, got {prior_seconds_per_element}")
        self.prior = float(prior_seconds_per_element)
        self._weight = weight
        self.measured: dict[str, float] = {}

    def seconds_per_element(self, level: str) -> float:
        if level in self.measured:
            return self.measured[level]
        return max(self.prior, max(self.measured.values(), default=0.0))

    def predict(self, level: str, elements: int) -> float:
        return elements * self.seconds_per_element(level)

    def add(self, level: str, elements: int, seconds: float) -> None:
        """Record that decoding ``elements`` elements of ``level`` took ``seconds``."""
        if elements <= 0:
            return
        rate = max(seconds, 0.0) / elements
        old = self.measured.get(level)
        self.measured[level] = rate if old is None else old + self._weight * (rate - old)


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
