"""Pure parts of streaming: byte ranges, the adaptive controller, path confinement."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvzip.stream.controller import (
    DecodeMeter,
    ThroughputMeter,
    choose_level,
    pipeline_seconds,
    rank_levels,
)
from kvzip.stream.middleware import Throttle
from kvzip.stream.paths import PathRejected, list_contexts, resolve_context
from kvzip.stream.ranges import (
    ByteRange,
    RangeNotSatisfiableError,
    RangeSyntaxError,
    parse_content_range,
    parse_range,
    range_header,
)

# ------------------------------------------------------------------------ ranges


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),  # suffix longer than the file: all of it
        ("bytes=50-5000", 100, (50, 100)),  # last byte past the end is clamped
        (" bytes=3-3 ", 100, (3, 4)),
    ],
)
def test_parse_range_accepts_single_ranges(header, size, expected):
    assert (lambda r: (r.start, r.end, r.total))(parse_range(header, size)) == (*expected, size)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-9",  # multipart
        "bytes=0-1, 3-4",
        "bytes=9-1",  # last before first
        "items=0-1",
        "bytes=abc",
        "bytes=-",
        "bytes=0x10-",
        "bytes=1" + "0" * 20 + "-",  # 21 digits: no file is that large
        "bytes=" + "1" * 200,  # oversized header
        "bytes=--1",
        "bytes=1-2-3",
        "",
    ],
)
def test_parse_range_refuses_malformed_headers(header):
    with pytest.raises(RangeSyntaxError):
        parse_range(header, 100)


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=500-600", 100),
                                              ("bytes=-0", 100), ("bytes=0-", 0)])
def test_parse_range_refuses_unsatisfiable_ranges(header, size):
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, size)


@given(st.integers(1, 10**12), st.data())
def test_range_header_round_trips(size, data):
    start = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - start))
    got = parse_range(range_header(start, length), size)
    assert (got.start, got.length) == (start, length)
    assert parse_content_range(got.content_range()) == got


@pytest.mark.parametrize(
    "value",
    ["", "bytes 0-9/*", "bytes 9-0/100", "bytes 0-100/100", "bytes */100", "items 0-1/5",
     "bytes 0-9/100, bytes 10-19/100", "bytes -1-9/100"],
)
def test_parse_content_range_refuses_what_a_reader_cannot_use(value):
    assert parse_content_range(value) is None


def test_parse_content_range_reads_a_206():
    assert parse_content_range("bytes 10-19/100") == ByteRange(10, 20, 100)


# -------------------------------------------------------------------- controller

# Four chunks, three levels: per-chunk payload bytes, best level first.
SIZES = [{"lossless": 1000, "balanced": 300, "small": 100}] * 4


def test_rank_levels_orders_by_total_size():
    sizes = [{"small": 1, "lossless": 9, "high": 5}, {"small": 2, "lossless": 8, "high": 5}]
    assert rank_levels(sizes) == ["lossless", "high", "small"]
    assert rank_levels([]) == []


@pytest.mark.parametrize(
    ("bytes_per_second", "expected"),
    [(10_000, "lossless"), (4000, "lossless"), (3999, "balanced"), (1200, "balanced"),
     (1199, "small"), (400, "small"), (399, None)],
)
def test_choose_level_picks_the_best_level_that_meets_the_deadline(bytes_per_second, expected):
    decision = choose_level(SIZES, rank_levels(SIZES), bytes_per_second, seconds_left=1.0)
    assert decision.level == expected
    assert decision.recompute == (expected is None)
    if expected is not None:  # the promise the controller makes
        assert decision.predicted_seconds <= 1.0


@given(st.lists(st.floats(1.0, 1e7), min_size=2, max_size=8), st.floats(0.01, 100.0))
def test_levels_only_drop_as_bandwidth_drops(rates, seconds_left):
    ranked = rank_levels(SIZES)
    order = [*ranked, None]
    picks = [order.index(choose_level(SIZES, ranked, r, seconds_left).level)
             for r in sorted(rates, reverse=True)]
    assert picks == sorted(picks)


def test_choose_level_plans_for_the_remaining_chunks_only():
    ranked = rank_levels(SIZES)
    # 1.0 s at 1200 B/s: four chunks fit only at balanced, the last one alone fits lossless.
    assert choose_level(SIZES, ranked, 1200, 1.0).level == "balanced"
    assert choose_level(SIZES[-1:], ranked, 1200, 1.0).level == "lossless"


def test_choose_level_with_no_level_allowed_recomputes():
    assert choose_level(SIZES, [], 1e9, 100.0).recompute


def test_choose_level_refuses_nonsense():
    with pytest.raises(ValueError):
        choose_level([], ["small"], 1.0, 1.0)
    with pytest.raises(ValueError):
        choose_level(SIZES, ["small"], 0.0, 1.0)


def test_simulated_link_meets_the_deadline_and_degrades_gracefully():
    """The controller in a loop over a simulated link that drops from 8000 to 2000 B/s.

    The estimate lags the link by one chunk (it is measured on the chunk before),
    so the drop is paid once, and the plan for the rest absorbs it.
    """
    sizes = [{"lossless": 1000, "balanced": 300, "small": 100}] * 8
    trace = [8000.0] * 2 + [2000.0] * 6
    ranked = rank_levels(sizes)
    meter = ThroughputMeter(8000)
    elapsed, deadline, picks = 0.0, 1.6, []
    for i, bandwidth in enumerate(trace):
        decision = choose_level(sizes[i:], ranked, meter.bytes_per_second, deadline - elapsed)
        picks.append(decision.level)
        if decision.level is not None:
            seconds = sizes[i][decision.level] / bandwidth
            meter.add(sizes[i][decision.level], seconds)
            elapsed += seconds
    assert elapsed <= deadline
    assert picks[0] == "lossless" and picks[-1] == "balanced"
    order = [*ranked, None]
    assert [order.index(p) for p in picks] == sorted(order.index(p) for p in picks)


def test_throughput_meter_follows_measurements():
    meter = ThroughputMeter(1000, weight=0.5)
    meter.add(4000, 1.0)
    assert meter.bytes_per_second == 2500
    for _ in range(20):
        meter.add(100, 1.0)
    assert meter.bytes_per_second == pytest.approx(100, rel=1e-3)
    with pytest.raises(ValueError):
        ThroughputMeter(0)


# ------------------------------------------------------------------------- paths


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.kvz").write_bytes(b"a")
    (root / "sub" / "b.kvz").write_bytes(b"b")
    (root / ".hidden.kvz").write_bytes(b"h")
    (root / "notes.txt").write_bytes(b"t")
    (tmp_path / "secret.kvz").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.kvz", root / "out.kvz")
    os.symlink(tmp_path, root / "outdir")
    os.symlink(root / "a.kvz", root / "in.kvz")
    return root.resolve()


def test_resolve_context_finds_files_under_the_root(root):
    assert resolve_context(root, "a.kvz") == root / "a.kvz"
    assert resolve_context(root, "sub/b.kvz") == root / "sub" / "b.kvz"
    assert resolve_context(root, "in.kvz") == root / "a.kvz"  # a link that stays inside


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("../secret.kvz", 400), ("sub/../../secret.kvz", 400), ("./a.kvz", 400),
        ("/etc/passwd", 400), ("sub//b.kvz", 400), ("a.kvz\x00.kvz", 400), ("..\\secret.kvz", 400),
        ("out.kvz", 404), ("outdir/secret.kvz", 404), (".hidden.kvz", 404), ("notes.txt", 404),
        ("missing.kvz", 404), ("sub", 404), ("", 404), ("x" * 2000 + ".kvz", 400),
    ],
)
def test_resolve_context_refuses_everything_else(root, name, status):
    with pytest.raises(PathRejected) as info:
        resolve_context(root, name)
    assert info.value.status == status


def test_list_contexts_lists_only_servable_files(root):
    assert list(list_contexts(root)) == ["a.kvz", "in.kvz", "sub/b.kvz"]


def test_a_slow_recompute_falls_back_to_the_smallest_level():
    ranked = rank_levels(SIZES)
    # 399 B/s: nothing fits in 1 s; the smallest level would take ~1.003 s for the four chunks.
    assert choose_level(SIZES, ranked, 399, 1.0, recompute_seconds=None).recompute
    assert choose_level(SIZES, ranked, 399, 1.0, recompute_seconds=0.5).recompute
    slow = choose_level(SIZES, ranked, 399, 1.0, recompute_seconds=30.0)
    assert slow.level == "small" and slow.predicted_seconds == pytest.approx(400 / 399)
    assert choose_level(SIZES, [], 399, 1.0, recompute_seconds=30.0).recompute


def test_recompute_is_chosen_when_it_beats_every_level_that_fits():
    """A small model on an accelerator recomputes faster than it can fetch: exact and sooner."""
    ranked = rank_levels(SIZES)
    fetched = choose_level(SIZES, ranked, 4000, 1.0)
    assert fetched.level is not None and fetched.predicted_seconds > 0.05
    fast = choose_level(SIZES, ranked, 4000, 1.0, recompute_seconds=0.05)
    assert fast.recompute and fast.predicted_seconds == pytest.approx(0.05)
    # slower than the level that fits: the cache wins (a long context, a big model)
    slow = choose_level(SIZES, ranked, 4000, 1.0, recompute_seconds=fetched.predicted_seconds * 2)
    assert slow.level == fetched.level
    # the decoder's backlog comes before a recompute too
    near = fetched.predicted_seconds - 0.01
    assert choose_level(SIZES, ranked, 4000, 1.0, recompute_seconds=near).recompute
    busy = choose_level(SIZES, ranked, 4000, 1.0, recompute_seconds=near, decoder_busy=0.02)
    assert busy.level == fetched.level


# ------------------------------------------------------- controller: decode time


def test_pipeline_overlaps_decoding_with_downloading():
    # Network-bound: all transfers, then the last decode.
    assert pipeline_seconds([1.0, 1.0, 1.0], [0.2, 0.2, 0.2]) == pytest.approx(3.2)
    # Decode-bound: the first transfer, then all decodes.
    assert pipeline_seconds([0.1, 0.1, 0.1], [1.0, 1.0, 1.0]) == pytest.approx(3.1)
    # A busy decoder delays the first decode, not the downloads.
    assert pipeline_seconds([0.1, 0.1], [0.5, 0.5], decoder_busy=2.0) == pytest.approx(3.0)
    assert pipeline_seconds([], []) == 0.0
    with pytest.raises(ValueError):
        pipeline_seconds([1.0], [])


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=1, max_size=10),
       st.floats(0, 10))
def test_pipeline_is_bounded_by_its_stages(stages, busy):
    transfer, decode = [t for t, _ in stages], [d for _, d in stages]
    total = pipeline_seconds(transfer, decode, busy)
    lower = max(sum(transfer) + decode[-1], busy + sum(decode), transfer[0] + sum(decode))
    assert total >= lower - 1e-9
    assert total <= busy + sum(transfer) + sum(decode) + 1e-9


def test_a_level_whose_decode_alone_misses_the_deadline_is_not_chosen_on_an_infinite_link():
    ranked = rank_levels(SIZES)
    decode = {"lossless": [0.1] * 4, "balanced": [0.4] * 4, "small": [0.2] * 4}
    # balanced decodes in 1.6 s > 1 s: skipped for small although both cost no network time.
    decision = choose_level(SIZES, ranked[1:], math.inf, 1.0, decode_seconds=decode)
    assert decision.level == "small" and decision.predicted_seconds == pytest.approx(0.8)
    # Every level too slow to decode: recompute (CacheGen), or the fastest when recomputing
    # is known to be slower still.
    slow = {level: [1.0] * 4 for level in ranked} | {"balanced": [0.5] * 4}
    assert choose_level(SIZES, ranked, math.inf, 1.0, decode_seconds=slow).recompute
    fallback = choose_level(SIZES, ranked, math.inf, 1.0, recompute_seconds=60.0,
                            decode_seconds=slow)
    assert fallback.level == "balanced" and fallback.predicted_seconds == pytest.approx(2.0)


def test_decode_time_moves_the_choice_down_where_the_network_alone_would_not():
    ranked = rank_levels(SIZES)
    # 4000 B/s: the network alone allows lossless in exactly 1.0 s (see the table above).
    assert choose_level(SIZES, ranked, 4000, 1.0).level == "lossless"
    decode = {level: [0.05] * 4 for level in ranked}
    # The last chunk's 0.05 s decode comes after the network: lossless no longer fits.
    assert choose_level(SIZES, ranked, 4000, 1.0, decode_seconds=decode).level == "balanced"
    # Nor does it once the decoder is still busy with chunks already fetched.
    assert choose_level(SIZES, ranked, 1e9, 1.0, decode_seconds=decode,
                        decoder_busy=0.9).level is None


def test_simulated_cpu_bound_client_meets_the_deadline_that_network_only_planning_misses():
    """Eight chunks over a 2000 B/s link; decoding costs more per byte at the smaller levels
    (as entropy-coded levels do on a CPU).  Planning only the network picks a level whose
    decode then blows the deadline; planning both meets it, and the decode meter learns the
    true costs from a prior that is wrong for every level."""
    sizes = [{"lossless": 2000, "balanced": 300, "small": 100}] * 8
    true_decode = {"lossless": 0.02, "balanced": 0.35, "small": 0.15}  # seconds per chunk
    ranked, deadline, elements = rank_levels(sizes), 2.0, 1000

    def simulate(plan_decode: bool) -> float:
        meter, decode_meter = ThroughputMeter(2000), DecodeMeter(1e-4)  # prior: 0.1 s/chunk
        arrived = decoded = 0.0
        for i in range(len(sizes)):
            decode = {level: [decode_meter.predict(level, elements)] * (len(sizes) - i)
                      for level in ranked}
            busy = max(0.0, decoded - arrived)
            decision = choose_level(sizes[i:], ranked, meter.bytes_per_second,
                                    deadline - arrived, recompute_seconds=100.0,
                                    decode_seconds=decode if plan_decode else None,
                                    decoder_busy=busy if plan_decode else 0.0)
            level = decision.level
            assert level is not None
            arrived += sizes[i][level] / 2000
            meter.add(sizes[i][level], sizes[i][level] / 2000)
            decoded = max(decoded, arrived) + true_decode[level]
            decode_meter.add(level, elements, true_decode[level])
        return decoded

    assert simulate(plan_decode=False) > deadline
    assert simulate(plan_decode=True) <= deadline


def test_decode_meter_starts_from_the_prior_and_learns_each_level():
    meter = DecodeMeter(1e-6, weight=0.5)
    assert meter.predict("small", 1000) == pytest.approx(1e-3)
    meter.add("small", 1000, 0.01)  # 1e-5 s/element: slower than the prior
    assert meter.seconds_per_element("small") == pytest.approx(1e-5)
    # An unmeasured level is assumed as slow as the slowest measured one.
    assert meter.seconds_per_element("high") == pytest.approx(1e-5)
    meter.add("lossless", 1000, 0.0)
    assert meter.seconds_per_element("lossless") == 0.0
    meter.add("small", 1000, 0.03)
    assert meter.seconds_per_element("small") == pytest.approx(2e-5)
    with pytest.raises(ValueError):
        DecodeMeter(-1.0)


# ---------------------------------------------------------------------- throttle


def test_throttle_credits_late_wake_ups_within_a_response():
    """A sender that always wakes 1 ms late (epoll's rounding) still gets the full rate."""
    throttle = Throttle.constant(1000)  # 125 MB/s: a 16 KiB piece every 131 us
    now, piece, pieces = 1000.0, 16 << 10, 2000
    throttle._origin = now
    start = now
    for i in range(pieces):
        done = throttle.reserve(piece, now, continuing=i > 0)
        now = max(now, done + 0.001) if done > now else now + 20e-6  # sleep overshoots 1 ms
    rate = pieces * piece / (now - start)
    assert rate == pytest.approx(125e6, rel=0.05)


def test_throttle_banks_no_idle_time_for_a_new_response():
    throttle = Throttle.constant(8)  # 1 MB/s
    throttle.reserve(1000, 10.0)
    # An hour idle, then a new response: its first piece still takes its full link time.
    assert throttle.reserve(10_000, 3610.0) == pytest.approx(3610.01)
    # A piece of a response already under way may catch up on a late wake-up, by at most slack.
    assert throttle.reserve(10_000, 3611.0, continuing=True) == pytest.approx(
        3611.0 - throttle.slack + 0.01)
