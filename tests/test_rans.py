"""The ``rans`` entropy layout (kvzip's C coder): exact round trips, the stream
checked against an independent Python decoder written from the format notes in
``_rans.c``, corrupt input refused with CodecError (never a crash), and parallel
decoding on threads giving the same bytes as one thread."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from kvzip.codecs._rans import LANES, PREC

from kvzip.codecs import entropy as E
from kvzip.codecs import kvzip_profile
from kvzip.codecs.entropy import _common as C
from kvzip.codecs.entropy import entropy_layout
from kvzip.codecs.entropy import rans as R
from kvzip.errors import CodecError

RANS = entropy_layout("rans")


def _matrix(rng, g=40, n=37, wide=False):
    scale = rng.uniform(0.3, 3000.0 if wide else 30.0, g)[:, None]
    m = np.rint(rng.standard_normal((g, n)) * scale + rng.integers(-500, 500, g)[:, None]).astype(np.int64)
    m[::7] = rng.integers(-5, 5)  # some constant rows
    return m


def _split(data: bytes):
    side_len, nwords = E._HEAD.unpack_from(data, 0)
    side = zstandard.ZstdDecompressor().decompress(data[E._HEAD.size : E._HEAD.size + side_len])
    words = np.frombuffer(data, "<u2", nwords, E._HEAD.size + side_len)
    return side, words, E._HEAD.size + side_len


def reference_decode(data: bytes, g: int, n: int) -> np.ndarray:
    """The format, decoded one symbol at a time in Python (slow; for tests only)."""
    side, words, _ = _split(data)
    nc, center, cid, (frac, sidx, shape, lo, span), _ = C.parse_cluster_side(side, g, 11)
    out = np.repeat(center[:, None], n, axis=1).astype(np.int64)
    if not nc:
        return out
    raw, span_h, freqs, foff = R._rans_tables(frac, sidx, shape, lo, span)
    total, low_l = 1 << PREC, 1 << 16
    w = [int(v) for v in words]
    x = [w[2 * k] | (w[2 * k + 1] << 16) for k in range(LANES)]
    pos, lane = 2 * LANES, 0

    def step(xs, f, c, slot):
        nonlocal pos
        xs = f * (xs >> PREC) + slot - c
        if xs < low_l:
            xs = (xs << 16) | w[pos]
            pos += 1
        return xs

    for c in range(nc):
        f = [int(v) for v in freqs[foff[c] : foff[c] + span_h[c]]]
        cum = np.concatenate([[0], np.cumsum(f)]).tolist()
        assert cum[-1] == total
        for row in np.flatnonzero(cid == c):
            for t in range(n):
                slot = x[lane] & (total - 1)
                h = int(np.searchsorted(cum, slot, side="right")) - 1
                xs = step(x[lane], f[h], cum[h], slot)
                v = h
                if raw[c]:
                    fl = 1 << (PREC - raw[c])
                    slot = xs & (total - 1)
                    low = slot // fl
                    xs = step(xs, fl, low * fl, slot)
                    v = (h << raw[c]) | low
                x[lane] = xs
                lane = (lane + 1) % LANES
                out[row, t] = v + lo[c] + center[row]
    assert x == [low_l] * LANES and pos == len(w)  # the end-state check
    return out


@pytest.mark.parametrize("wide", [False, True])
def test_stream_matches_an_independent_decoder(wide):
    rng = np.random.default_rng(5 + wide)
    m = _matrix(rng, g=12, n=21, wide=wide)
    data = RANS.encode(m)
    if wide:  # clusters wider than 2**(PREC-1) values code their low bits separately
        side, _, _ = _split(data)
        *_, (f, s, sh, lo, span), _ = C.parse_cluster_side(side, 12, 11)
        assert R._rans_tables(f, s, sh, lo, span)[0].max() > 0
    np.testing.assert_array_equal(reference_decode(data, *m.shape), m)
    np.testing.assert_array_equal(RANS.decode(data, m.shape), m)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 70), st.booleans())
def test_round_trip_is_exact(seed, g, n, wide):
    m = _matrix(np.random.default_rng(seed), g, n, wide)
    np.testing.assert_array_equal(RANS.decode(RANS.encode(m), m.shape), m)


def test_tables_sum_to_the_total_and_favour_the_mode():
    rng = np.random.default_rng(2)
    nc = 50
    frac, sidx, shape = rng.integers(0, 4, nc), rng.integers(0, 256, nc), rng.integers(0, 4, nc)
    span = rng.integers(2, 9000, nc)
    lo = -(span // 2)
    raw, span_h, freqs, foff = R._rans_tables(frac, sidx, shape, lo, span)
    assert (span_h <= R.RANS_MAX_SPAN_H).all() and (((span - 1) >> raw) + 1 == span_h).all()
    sums = np.add.reduceat(freqs.astype(np.int64), foff)
    assert (sums == 1 << PREC).all() and freqs.min() >= 1


def test_a_matrix_of_constant_rows_codes_no_words():
    m = np.repeat(np.arange(-3, 5)[:, None], 9, axis=1)
    data = RANS.encode(m)
    assert _split(data)[1].size == 0
    np.testing.assert_array_equal(RANS.decode(data, m.shape), m)


def test_corrupt_streams_are_codec_errors():
    m = _matrix(np.random.default_rng(9), g=20, n=33)
    data = RANS.encode(m)
    _, words, start = _split(data)
    with pytest.raises(CodecError):  # one word missing
        RANS.decode(data[:-2], m.shape)
    side_len, nwords = E._HEAD.unpack_from(data, 0)
    short = E._HEAD.pack(side_len, nwords - 1) + data[E._HEAD.size : -2]
    with pytest.raises(CodecError, match="corrupt"):
        RANS.decode(short, m.shape)
    for i in (0, 3, words.size // 2, words.size - 1):  # a flipped word: wrong end state or symbol
        bad = bytearray(data)
        bad[start + 2 * i] ^= 0x5A
        try:
            got = RANS.decode(bytes(bad), m.shape)
        except CodecError:
            continue
        assert not np.array_equal(got, m)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 2**31))
def test_random_bytes_never_crash(junk, seed):
    rng = np.random.default_rng(seed)
    data = RANS.encode(_matrix(rng, g=6, n=11))
    cut = int(rng.integers(0, len(data)))
    for candidate in (junk, data[:cut] + junk, data[:cut] + junk + data[cut + len(junk):]):
        try:
            out = RANS.decode(candidate, (6, 11))
        except CodecError:
            continue
        assert out.shape == (6, 11)


def test_side_info_naming_rows_twice_or_out_of_range_is_refused():
    m = _matrix(np.random.default_rng(4), g=8, n=10)
    data = RANS.encode(m)
    side, _, start = _split(data)
    nc = struct.unpack_from("<I", side, 0)[0]
    cid = np.frombuffer(side, "<u2", 8, 4 + 4 * 8).copy()
    cid[cid != C._CONST_ROW] = nc + 3  # an unknown cluster
    bad_side = side[: 4 + 32] + cid.tobytes() + side[4 + 48 :]
    packed = zstandard.ZstdCompressor().compress(bad_side)
    bad = E._HEAD.pack(len(packed), E._HEAD.unpack_from(data, 0)[1]) + packed + data[start:]
    with pytest.raises(CodecError):
        RANS.decode(bad, m.shape)


def test_out_of_window_symbols_are_refused_by_the_encoder():
    with pytest.raises(CodecError, match="32-bit"):
        RANS.encode(np.array([[0, 1 << 40]], np.int64))


def test_blas_limit_is_restored_after_threads_overlap():
    """As decode_level_threads uses it: the starting thread holds the limit, its
    threads nest it; BLAS is at one thread inside and restored after, and this
    holds after the calling thread has already used (and restored) it once."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    assert before and min(before) > 1, "needs a multi-threaded BLAS to mean anything"
    with kvzip_profile.one_blas_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    barrier, seen = threading.Barrier(4), []

    def work():
        barrier.wait()
        for _ in range(20):
            with kvzip_profile.one_blas_thread():
                seen.append(blas_threads())

    with kvzip_profile.one_blas_thread():
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(seen) == 80 and all(set(v) == {1} for v in seen)
    assert blas_threads() == before  # the last one out restored it


def test_tables_are_the_same_in_batches(monkeypatch):
    rng = np.random.default_rng(8)
    nc = 40
    args = (rng.integers(0, 4, nc), rng.integers(0, 256, nc), rng.integers(0, 4, nc),
            -rng.integers(1, 3000, nc), rng.integers(2, 6000, nc))
    whole = R._rans_tables(*args)
    monkeypatch.setattr(R, "_RANS_BATCH_CELLS", 5000)  # a few clusters per batch, some alone
    for a, b in zip(whole, R._rans_tables(*args)):
        np.testing.assert_array_equal(a, b)


def test_huge_declared_windows_do_not_take_memory_in_proportion(monkeypatch):
    """Side info may declare 65,536 values for every cluster: decoding must refuse or
    finish without weighing them all at once."""
    import tracemalloc

    g, n = 400, 4
    m = np.zeros((g, n), np.int64)
    m[:, 0] = np.arange(g)  # every row coded, each its own model if the fit says so
    data = RANS.encode(m)
    side, words, start = _split(data)
    nc = struct.unpack_from("<I", side, 0)[0]
    pos = 4 + 6 * g
    spans = np.full(nc, 1 << 16, "<i4")
    los = np.full(nc, -(1 << 15), "<i4")
    bad_side = side[: pos + 3 * nc] + los.tobytes() + spans.tobytes()
    packed = zstandard.ZstdCompressor().compress(bad_side)
    bad = E._HEAD.pack(len(packed), words.size) + packed + data[start:]
    tracemalloc.start()
    try:
        RANS.decode(bad, (g, n))
    except CodecError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20, peak  # unbatched, nc * 65,536 values would take gigabytes
