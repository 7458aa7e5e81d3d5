"""Every entropy layout behind the one interface: each class round-trips, the lookup
refuses unknown names, and corrupt blocks are CodecErrors.  Then the bitstreams of
``hist``, ``param`` and ``param2`` decoded by a separate pure-Python implementation
written from docs/format.md ("Entropy layouts"): its own weight tables, constriction's
quantisation of floating-point weights and constriction's range and ANS decoders,
symbol by symbol.  (tests/test_rans.py does the same for ``rans``.)"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import zstandard

from kvzip.codecs.entropy import (
    LAYOUTS,
    EntropyLayout,
    HistLayout,
    Param2Layout,
    ParamLayout,
    RansLayout,
    entropy_layout,
)
from kvzip.codecs.stages import SymbolCoder
from kvzip.errors import CodecError

CLASSES = {"hist": HistLayout, "param": ParamLayout, "param2": Param2Layout, "rans": RansLayout}


def _matrix(rng, g=24, n=33, scale_hi=30.0):
    scale = np.exp(rng.uniform(np.log(0.2), np.log(scale_hi), g))[:, None]
    m = np.rint(rng.laplace(0, 1, (g, n)) * scale + rng.integers(-300, 300, g)[:, None]).astype(np.int64)
    m[::5] = rng.integers(-9, 9)  # constant rows
    return m


# ---- the interface -------------------------------------------------------------------
def test_the_lookup_knows_each_class_by_its_name():
    assert list(LAYOUTS) == ["hist", "param", "param2", "rans"]
    for name, cls in CLASSES.items():
        layout = entropy_layout(name)
        assert type(layout) is cls and LAYOUTS[name] is cls and layout.name == name
        assert isinstance(layout, EntropyLayout) and isinstance(layout, SymbolCoder)
        assert layout.releases_gil == (name == "rans")  # constriction holds the GIL


@pytest.mark.parametrize("bad", ["nope", "", "RANS", 2, None, ["rans"]])
def test_an_unknown_layout_is_a_codec_error_naming_the_known_ones(bad):
    with pytest.raises(CodecError, match="hist, param, param2, rans"):
        entropy_layout(bad)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 40), (24, 33), (7, 128)])
def test_each_layout_round_trips(name, shape):
    rng = np.random.default_rng([sum(map(ord, name)), *shape])
    m = _matrix(rng, *shape)
    layout = CLASSES[name]()
    data = layout.encode(m)
    assert data == layout.encode(m.copy())
    out = layout.decode(data, m.shape)
    assert out.dtype == np.int32 and np.array_equal(out, m)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_layout_round_trips_wide_constant_and_empty_matrices(name):
    layout = CLASSES[name]()
    rng = np.random.default_rng(3)
    wide = _matrix(rng, 6, 50, scale_hi=4000.0)  # windows past 2**11 values: raw low bits
    const = np.full((4, 9), -7, np.int64)
    for m in (wide, const):
        np.testing.assert_array_equal(layout.decode(layout.encode(m), m.shape), m)
    for shape in ((0, 5), (5, 0)):
        empty = np.zeros(shape, np.int64)
        assert layout.decode(layout.encode(empty), shape).shape == shape


@pytest.mark.parametrize("name", list(CLASSES))
def test_corrupt_blocks_are_codec_errors(name):
    layout = CLASSES[name]()
    rng = np.random.default_rng(11)
    m = _matrix(rng, 12, 21)
    data = layout.encode(m)
    with pytest.raises(CodecError):
        layout.decode(data[:5], m.shape)
    with pytest.raises(CodecError):
        layout.decode(data + b"\0\0\0\0" if name != "param2" else data[:-1], m.shape)
    for _ in range(40):
        bad = bytearray(data)
        for _ in range(3):
            bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
        try:
            out = layout.decode(bytes(bad), m.shape)
        except CodecError:
            continue
        assert out.shape == m.shape and out.dtype == np.int32


# ---- the spec, implemented again --------------------------------------------------------
# Everything below follows docs/format.md, not kvzip's code.
PREC = 24  # constriction's default models: 24-bit probabilities, 32-bit words, 64-bit state
M64 = (1 << 64) - 1
R4 = (4096, 4871, 5793, 6889)
R8 = (65536, 71468, 77936, 84990, 92682, 101070, 110218, 120194)
BETAS = (0.6, 1.0, 1.5, 2.0)
GG = [[max(1, round(65536.0 * math.exp(-(((i + 0.5) / 16) ** b)))) for i in range(1024)] for b in BETAS]
GG_SHA256 = "37870763604fa02011412ff732ea4b692e0861daa18c9423bd4f94ebe0e85cb8"  # as in docs/format.md


def test_weight_tables_match_their_published_digest():
    assert hashlib.sha256(np.array(GG, "<u4").tobytes()).hexdigest() == GG_SHA256
    from kvzip.codecs.entropy import _common

    assert np.array_equal(_common._GG, np.array(GG))


def gg_weight(k: int, frac: int, sidx: int, shape: int) -> int:
    d = abs(4 * k - frac)
    s = R8[sidx & 7] << (sidx >> 3)
    return GG[shape][min((d << 22) // s, 1023)]


def quantized_cdf(weights) -> list[int]:
    """constriction's ``Categorical(weights, perfect=False)``: the 24-bit CDF."""
    w = [float(x) for x in weights]
    n = len(w)
    assert 2 <= n < (1 << PREC) - 1
    norm = 0.0
    for x in w:  # left to right, binary64
        norm += x
    scale = float((1 << PREC) - n) / norm
    cdf, cum = [], 0.0
    for i, x in enumerate(w):
        cdf.append(int(cum * scale) + i)
        cum += x
    return cdf + [1 << PREC]


def find(cdf, q):
    lo, hi = 0, len(cdf) - 2
    while lo < hi:  # the last symbol s with cdf[s] <= q
        mid = (lo + hi + 1) // 2
        if cdf[mid] <= q:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RangeDecoder:
    def __init__(self, words):
        self.w, self.pos = [int(x) for x in words], 2
        hi = self.w[0] if self.w else 0
        lo = self.w[1] if len(self.w) > 1 else 0
        self.point, self.lower, self.range = (hi << 32) | lo, 0, M64

    def decode(self, cdf):
        scale = self.range >> PREC
        q = ((self.point - self.lower) & M64) // scale
        if q >= 1 << PREC:
            raise ValueError("invalid data")
        s = find(cdf, q)
        self.lower = (self.lower + scale * cdf[s]) & M64
        self.range = scale * (cdf[s + 1] - cdf[s])
        if self.range < 1 << 32:
            self.lower, self.range = (self.lower << 32) & M64, self.range << 32
            word = self.w[self.pos] if self.pos < len(self.w) else 0
            self.pos += 1
            self.point = ((self.point << 32) & M64) | word
        return s


class AnsDecoder:
    def __init__(self, words):
        self.w = [int(x) for x in words]
        if self.w and self.w[-1] == 0:
            raise ValueError("ANS data never ends in a zero word")
        self.state = self.w.pop() if self.w else 0
        while self.state < 1 << 32 and self.w:
            self.state = (self.state << 32) | self.w.pop()

    def decode(self, cdf):
        q = self.state & ((1 << PREC) - 1)
        s = find(cdf, q)
        self.state = (self.state >> PREC) * (cdf[s + 1] - cdf[s]) + q - cdf[s]
        if self.state < 1 << 32 and self.w:
            self.state = (self.state << 32) | self.w.pop()
        return s


def split_block(data: bytes):
    side_len, nwords = struct.unpack_from("<II", data, 0)
    side = zstandard.ZstdDecompressor().decompress(data[8 : 8 + side_len])
    words = struct.unpack_from(f"<{nwords}I", data, 8 + side_len)
    return side, words, data[8 + side_len + 4 * nwords :]


def spec_hist(data: bytes, g: int, n: int) -> np.ndarray:
    side, words, rest = split_block(data)
    assert not rest
    lo = struct.unpack_from(f"<{g}i", side, 0)
    span = struct.unpack_from(f"<{g}i", side, 4 * g)
    pos, out = 8 * g, np.zeros((g, n), np.int64)
    dec = RangeDecoder(words)
    for r in range(g):
        out[r] = lo[r]
        if span[r] == 1:
            continue
        q = side[pos : pos + span[r]]
        pos += span[r]
        cdf = quantized_cdf([0 if c == 0 else R4[(c - 1) & 3] << ((c - 1) >> 2) for c in q])
        for t in range(n):
            out[r, t] = lo[r] + dec.decode(cdf)
    assert pos == len(side)
    return out


def cluster_side(side: bytes, g: int, extra: int):
    (nc,) = struct.unpack_from("<I", side, 0)
    assert len(side) == 4 + 6 * g + (11 + extra) * nc
    center = struct.unpack_from(f"<{g}i", side, 4)
    cid = struct.unpack_from(f"<{g}H", side, 4 + 4 * g)
    p = 4 + 6 * g
    cols = [side[p + i * nc : p + (i + 1) * nc] for i in range(3)]
    lo = struct.unpack_from(f"<{nc}i", side, p + 3 * nc)
    span = struct.unpack_from(f"<{nc}i", side, p + 7 * nc)
    more = [side[p + (11 + i) * nc : p + (12 + i) * nc] for i in range(extra)]
    return nc, center, cid, list(zip(*cols, lo, span, *more))


def cluster_cells(cid, c, n):
    """The (row, token) of each element of cluster c, in coded order."""
    return [(r, t) for r in range(len(cid)) if cid[r] == c for t in range(n)]


def spec_param(data: bytes, g: int, n: int) -> np.ndarray:
    side, words, rest = split_block(data)
    assert not rest
    nc, center, cid, clusters = cluster_side(side, g, 0)
    out = np.array(center, np.int64)[:, None].repeat(n, axis=1)
    dec = RangeDecoder(words)
    for c, (frac, sidx, shape, lo, span) in enumerate(clusters):
        w = [gg_weight(k, frac, sidx, shape) for k in range(lo, lo + span)]
        single = quantized_cdf(w)
        cells = cluster_cells(cid, c, n)
        syms = []
        if span <= 40:
            pair = quantized_cdf([a * b for a in w for b in w])
            for _ in range(len(cells) // 2):
                p = dec.decode(pair)
                syms += [p // span, p % span]
        while len(syms) < len(cells):
            syms.append(dec.decode(single))
        for (r, t), s in zip(cells, syms):
            out[r, t] = s + lo + center[r]
    return out


def spec_param2(data: bytes, g: int, n: int) -> np.ndarray:
    side, words, planes = split_block(data)
    nc, center, cid, clusters = cluster_side(side, g, 2)
    out = np.array(center, np.int64)[:, None].repeat(n, axis=1)
    dec = AnsDecoder(words)
    ppos = 0
    for c, (frac, sidx, shape, lo, span, raw, tup) in enumerate(clusters):
        w = [gg_weight(k, frac, sidx, shape) for k in range(lo, lo + span)]
        span_h = ((span - 1) >> raw) + 1
        wh = [sum(w[h << raw : (h + 1) << raw]) for h in range(span_h)]
        cells = cluster_cells(cid, c, n)
        m = len(cells)
        hs = []
        if tup > 1:
            cap = (0, 53, 26, 17, 13)[tup]
            top = max(wh).bit_length()
            wt = [max(x >> (top - cap), 1) for x in wh] if top > cap else wh
            prod = [float(x) for x in wt]
            for _ in range(tup - 1):
                prod = [a * float(b) for a in prod for b in wt]
            tcdf = quantized_cdf(prod)
            for _ in range(m // tup):
                v = dec.decode(tcdf)
                digits = []
                for _ in range(tup):
                    digits.append(v % span_h)
                    v //= span_h
                hs += digits[::-1]
        single = quantized_cdf(wh)
        while len(hs) < m:
            hs.append(dec.decode(single))
        nb = (m + 7) // 8
        for i, ((r, t), h) in enumerate(zip(cells, hs)):
            low = sum(((planes[ppos + j * nb + (i >> 3)] >> (i & 7)) & 1) << j for j in range(raw))
            out[r, t] = ((h << raw) | low) + lo + center[r]
        ppos += raw * nb
    assert ppos == len(planes)
    return out


SPEC = {"hist": spec_hist, "param": spec_param, "param2": spec_param2}


@pytest.mark.parametrize("name", list(SPEC))
@pytest.mark.parametrize("seed,g,n,scale_hi", [(1, 12, 21, 30.0), (2, 9, 16, 1.5), (3, 5, 13, 3000.0),
                                               (4, 30, 7, 60.0), (5, 3, 1, 8.0)])
def test_bitstream_matches_an_independent_decoder(name, seed, g, n, scale_hi):
    m = _matrix(np.random.default_rng(seed), g, n, scale_hi)
    data = entropy_layout(name).encode(m)
    np.testing.assert_array_equal(SPEC[name](data, g, n), m)


def test_the_independent_decoders_cover_pairs_tuples_and_raw_bits():
    """The cases above reach each branch of the spec: pair and single models in
    ``param``, tuples, singles and raw low bits in ``param2``."""
    seen = set()
    for seed, g, n, scale_hi in [(1, 12, 21, 30.0), (2, 9, 16, 1.5), (3, 5, 13, 3000.0)]:
        m = _matrix(np.random.default_rng(seed), g, n, scale_hi)
        side, _, _ = split_block(entropy_layout("param").encode(m))
        seen |= {"pairs" if cl[4] <= 40 else "singles" for cl in cluster_side(side, g, 0)[3]}
        side, _, _ = split_block(entropy_layout("param2").encode(m))
        for cl in cluster_side(side, g, 2)[3]:
            seen |= {"raw" if cl[5] else "no-raw", "tuples" if cl[6] > 1 else "no-tuples"}
    assert seen == {"pairs", "singles", "raw", "no-raw", "tuples", "no-tuples"}
