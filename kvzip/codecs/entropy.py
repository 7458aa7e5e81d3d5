"""Entropy coding of symbol matrices with constriction's range coder.

Each row of a symbol matrix is one *group* (e.g. one (layer, channel) over the
chunk's tokens) with its own categorical model over ``[lo, lo + span)``.  The
models travel inside the payload, so a chunk decodes on its own.  Two ways to
describe a row's model:

``hist``   the row's empirical histogram, counts stored as 1/4-octave log codes
           (one byte per symbol value).  This is CacheGen's "one probability table
           per (layer, channel)"; exact but costly in side information for small
           chunks.
``param``  a discretised generalised Gaussian ``exp(-(|k - mu| / s) ** beta)`` with
           mu on a 1/4 grid, s on a 1/8-octave grid and beta from a fixed set: a
           few bytes per row, chosen by the encoder to minimise the real code length.
``param2`` the same models, laid out for decode speed: symbol pairs, low bits stored
           raw where they are nearly uniform, windows on a coarse grid, ANS coding
           (see the "param2" notes below).  A different bitstream from ``param``;
           files written with ``param`` keep decoding through the ``param`` path.
``rans``   the same models and side info as ``param``, coded by kvzip's own
           interleaved rANS coder in C (``kvzip/codecs/_rans.c``) with 12-bit
           frequency tables: one call per chunk that runs without the GIL, about
           ten times faster than constriction (see the "rans" notes below).

Decoder determinism: the probabilities handed to constriction must be bit-identical
on every machine, so both families turn their side information into *integer*
weights with integer arithmetic and small constant tables (no per-symbol libm
calls).  Rows whose span is 1 are constant and cost no coded bits.

Speed: ``hist``, ``param`` and ``param2`` decode with one constriction call per row or
cluster (no per-symbol Python); constriction itself runs at roughly 30-50 M symbols/s
on one core.  ``rans`` decodes a whole chunk in one C call.
"""

from __future__ import annotations

import functools
import math
import struct

import constriction
import numpy as np
import zstandard

from kvzip.codecs import _rans
from kvzip.codecs.base import zstd_decompress_bounded
from kvzip.codecs.stages import SymbolCoder
from kvzip.errors import CodecError

_Categorical = constriction.stream.model.Categorical
_RangeEncoder = constriction.stream.queue.RangeEncoder
_RangeDecoder = constriction.stream.queue.RangeDecoder
_AnsCoder = constriction.stream.stack.AnsCoder

MAX_SPAN = 1 << 16  # widest alphabet one row may use
_ZSTD_LEVEL = 9
_HEAD = struct.Struct("<II")  # side-info length, number of code words (uint32; uint16 for "rans")

# 2 ** (r / 4) * 4096 and 2 ** (r / 8) * 65536, rounded: exact integer tables.
_R4 = np.array([4096, 4871, 5793, 6889], dtype=np.int64)
_R8 = np.array([65536, 71468, 77936, 84990, 92682, 101070, 110218, 120194], dtype=np.int64)

# Generalised-Gaussian shapes and their weight tables, indexed by floor(16 * |k-mu| / s).
BETAS = (0.6, 1.0, 1.5, 2.0)
_U_RES = 16
_U_LEN = 64 * _U_RES


def _gg_table(beta: float) -> np.ndarray:
    # 1024 values rounded at 2**16 scale, computed once: a libm difference of a few
    # ulp cannot move a value across a rounding boundary in practice.
    vals = [max(1, round(65536.0 * math.exp(-(((i + 0.5) / _U_RES) ** beta)))) for i in range(_U_LEN)]
    return np.array(vals, dtype=np.int64)


_GG = np.stack([_gg_table(b) for b in BETAS])  # [n_betas, _U_LEN]
_BETAS_F = np.array(BETAS, np.float64)
_POWERS = np.ascontiguousarray((np.arange(4096) / 4.0)[None, :] ** _BETAS_F[:, None])  # (d / 4) ** beta
# Encoder-side copies: the weights and their log2 as float64, and s * 2**20 for every sidx.
_GG_F = _GG.astype(np.float64)
_LOG2_GG = np.log2(_GG_F)
_S_FIXED_F = (_R8[np.arange(256) & 7] << (np.arange(256) >> 3)).astype(np.float64)
# The encoder's fit (``_rans.fit_param``) computes u = min(floor(d * 2**22 / (s * 2**20)),
# _U_LEN - 1) in float64, and that equals the decoder's integer ``(d << 22) // s``:
# both operands are exact in float64 (d < 2**19, s < 2**49) and the correctly rounded
# quotient of two such integers cannot round up onto the next integer below 2**10
# (that would need s * u >= 2**53 with d * 2**22 < 2**41).
_S_OFFSET = 32  # sidx 0 <-> s = 2 ** -4
_CONST_ROW = 0xFFFF  # cluster id of a row whose symbols are all equal
_PAIR_MAX_SPAN = 40  # code symbol pairs when the alphabet is at most this wide


def _hist_weights(q: np.ndarray) -> np.ndarray:
    """1/4-octave log codes -> integer weights (0 stays 0)."""
    q = q.astype(np.int64)
    e = np.maximum(q - 1, 0)
    w = _R4[e & 3] << (e >> 2)
    return np.where(q > 0, w, 0)


def _s_fixed(sidx: np.ndarray) -> np.ndarray:
    """s * 2**20 as an integer, s = 2 ** ((sidx - 32) / 8)."""
    sidx = sidx.astype(np.int64)
    return _R8[sidx & 7] << (sidx >> 3)


def _ragged(span: np.ndarray, rows: np.ndarray):
    """Flat layout of rows' alphabets: (row number per cell, k - lo per cell, row offsets)."""
    sp = span[rows]
    total = int(sp.sum())
    offs = np.zeros(rows.size, np.int64)
    if rows.size:
        np.cumsum(sp[:-1], out=offs[1:])
    rid = np.repeat(np.arange(rows.size, dtype=np.int64), sp)
    kk = np.arange(total, dtype=np.int64) - np.repeat(offs, sp)
    return rid, kk, offs


def _param_weights(k, mu4, sidx, shape):
    """Integer weights of symbols ``k`` under (mu4, sidx, shape); all flat arrays."""
    d = np.abs(4 * k - mu4)
    # floor(16 * (d / 4) / s) == (d * 4 * 2**20) // (s * 2**20)
    u = (d << 22) // _s_fixed(sidx)
    np.minimum(u, _U_LEN - 1, out=u)
    return _GG[shape, u]


@functools.lru_cache(maxsize=4096)
def _cluster_models(frac: int, sidx: int, shape: int, lo: int, span: int):
    """constriction models of one cluster: (single, pair or None, pair lookup table or None).

    A cluster's model is fixed by five small integers that recur across rows, layers
    and chunks, so the models (building one costs as much as decoding a few thousand
    symbols) are built once per process.  The table maps a pair symbol
    ``a * span + b`` to ``(a + lo, b + lo)``.
    """
    k = np.arange(lo, lo + span, dtype=np.int64)
    w = _param_weights(k, np.int64(frac), np.int64(sidx), np.int64(shape)).astype(np.float64)
    single = _Categorical(w, perfect=False)
    if span > _PAIR_MAX_SPAN:
        return single, None, None
    pair = _Categorical(np.outer(w, w).ravel(), perfect=False)
    p = np.arange(span * span, dtype=np.int32)
    table = np.stack([p // span + lo, p % span + lo], axis=1).astype(np.int32)
    return single, pair, table


FAMILIES = ("hist", "param", "param2", "rans")

# ---- "param2": the "param" models, coded faster ---------------------------------
# Per cluster the encoder picks ``raw`` low bits and a tuple size ``tup``: each
# 0-based symbol s splits as s = (h << raw) | b; b is stored verbatim in bit planes
# (np.packbits) and h is range coded ``tup`` symbols at a time with the product
# model over span_h ** tup values (span_h = ceil(span / 2 ** raw)), its weights the
# cluster's integer weights summed over b.  constriction's cost per coded symbol is
# a fixed part plus a binary search over the alphabet, so tuples amortise the fixed
# part and raw bits shorten the search; when step << sigma the low bits are nearly
# uniform; the encoder takes the most low bits that cost at most _RAW_SLACK bits per
# element in that cluster.  Cluster windows [lo, lo + span) are rounded out to a
# coarse grid so the same models recur across chunks and layers (a model costs tens
# of microseconds to build; they are cached per process).  The coded stream is
# constriction's ANS coder (a stack: the encoder pushes clusters in reverse), a few
# per cent faster to decode than the range coder; then the bit planes, per cluster
# ``raw`` planes of ceil(m / 8) bytes (little-endian bit order).
# Measured on the lossy levels (benchmarks/decode_speed.py): ~+15% decode speed for
# ``high`` at +0.2% bits; triples (tup 3) and a 1024-value alphabet cap were slower.
MAX_RAW = 4  # raw low bits per symbol
MAX_TUP = 2  # symbols per coded tuple (the decoder accepts up to 4)
MAX_TUP_DECODE = 4
MAX_ALPHA = 4096  # widest tuple alphabet (memory of a cached model and its table)
_RAW_SLACK = 0.02  # bits per element a cluster may give up for raw low bits
_TUP_WEIGHT_BITS = (0, 53, 26, 17, 13)  # per-symbol weight cap so tuple weights stay exact in float64


_W_CACHE_MAX_R = 4096  # widest half-window whose weights are cached per model


@functools.lru_cache(maxsize=1024)
def _weights_around(frac: int, sidx: int, shape: int) -> tuple[int, np.ndarray]:
    """(R, integer weights of k in [-R, R]) for one (frac, sidx, shape); beyond R the
    weight is constant (the table saturates once |k - mu| >= 64 s)."""
    s = _R8[sidx & 7] << (sidx >> 3)  # s * 2**20
    r = min(int(-(-(64 * s) >> 20)) + 2, _W_CACHE_MAX_R)
    k = np.arange(-r, r + 1, dtype=np.int64)
    w = _param_weights(k, np.int64(frac), np.int64(sidx), np.int64(shape))
    w.flags.writeable = False
    return r, w


def _model_weights(frac: int, sidx: int, shape: int, lo: int, span: int) -> np.ndarray:
    """_param_weights over [lo, lo + span), from the cached window where it covers it."""
    r, w = _weights_around(frac, sidx, shape)
    if -r <= lo and lo + span - 1 <= r:
        return w[lo + r : lo + r + span]
    return _param_weights(np.arange(lo, lo + span, dtype=np.int64), np.int64(frac), np.int64(sidx),
                          np.int64(shape))


def _h_weights(frac: int, sidx: int, shape: int, lo: int, span: int, raw: int) -> np.ndarray:
    """Integer weights of h = s >> raw: the cluster's weights summed over the low bits."""
    w = _model_weights(frac, sidx, shape, lo, span)
    if not raw:
        return w
    span_h = ((span - 1) >> raw) + 1
    pad = np.zeros(span_h << raw, np.int64)
    pad[:span] = w
    return pad.reshape(span_h, 1 << raw).sum(axis=1)


@functools.lru_cache(maxsize=256)
def _tuple_digits(span_h: int, tup: int) -> np.ndarray:
    """[span_h ** tup, tup] int32: the base-span_h digits of each tuple symbol."""
    idx = np.arange(span_h**tup, dtype=np.int64)
    out = np.empty((idx.size, tup), np.int32)
    for j in range(tup - 1, -1, -1):
        out[:, j] = idx % span_h
        idx //= span_h
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=4096)
def _cluster_models2(frac: int, sidx: int, shape: int, lo: int, span: int, raw: int, tup: int):
    """("param2") constriction models of one cluster: (tuple model, tuple table,
    single model, single table).  Tables map a coded symbol to ``tup`` (resp. one)
    values ``(h << raw) + lo``, ready for the low bits and the row centre."""
    wh = _h_weights(frac, sidx, shape, lo, span, raw)
    span_h = wh.size
    vals = ((np.arange(span_h, dtype=np.int32) << raw) + np.int32(lo)).astype(np.int32)
    single = _Categorical(wh.astype(np.float64), perfect=False)
    if tup == 1:
        return None, None, single, vals
    cap = _TUP_WEIGHT_BITS[tup]
    top = int(wh.max()).bit_length()
    if top > cap:  # integer rescale keeps every tuple product an exact float64
        wh = np.maximum(wh >> (top - cap), 1)
    wf = wh.astype(np.float64)
    prod = wf
    for _ in range(tup - 1):
        prod = np.multiply.outer(prod, wf).ravel()
    table = _tuple_digits(span_h, tup) << raw
    table += np.int32(lo)
    return _Categorical(prod, perfect=False), table, single, vals


def _round_window(x: np.ndarray) -> np.ndarray:
    """Round x >= 0 up to the grid 0..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (4 steps an octave)."""
    x = np.asarray(x, np.int64)
    e = np.maximum(np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) - 2, 0)
    return ((x + (1 << e) - 1) >> e) << e


def _choose_layout(hist: np.ndarray, w: np.ndarray, span: int) -> tuple[int, int]:
    """Encoder: (raw, tup) for a cluster with symbol histogram ``hist`` and model
    weights ``w`` (both over its 0-based alphabet).  raw: the most low bits whose
    extra code length stays within _RAW_SLACK bits per element; tup: the most
    symbols per tuple whose alphabet fits MAX_ALPHA."""
    m = hist.sum()
    pos = np.arange(span)
    nz = hist > 0

    def cost(raw):
        wh = np.bincount(pos >> raw, w, ((span - 1) >> raw) + 1)
        p = wh[pos >> raw] / wh.sum()
        return -(hist[nz] * np.log2(p[nz])).sum() + raw * m

    base = cost(0)
    raw = 0
    for r in range(1, MAX_RAW + 1):
        if ((span - 1) >> r) == 0:  # keep at least two coded values
            break
        if cost(r) - base > _RAW_SLACK * m:
            break
        raw = r
    span_h = ((span - 1) >> raw) + 1
    tup = 1
    while tup < MAX_TUP and span_h ** (tup + 1) <= MAX_ALPHA:
        tup += 1
    return raw, tup


def clear_model_caches() -> None:
    """Forget every cached model (benchmarks: decode as a fresh process would)."""
    for f in (_cluster_models, _cluster_models2, _weights_around, _tuple_digits):
        f.cache_clear()


# ---- "rans": the "param" models, coded by kvzip's C coder ------------------------
# Side info is exactly "param"'s (no rounded windows, no per-cluster layout bytes).
# Each cluster's model becomes a frequency table over span_h = ceil(span / 2**raw)
# values summing to 2**PREC (PREC = 12), with raw the fewest low bits that make
# span_h <= 2**(PREC - 1); the low bits are then coded as uniform symbols.  The
# quantisation is integer arithmetic, so every machine derives the same tables:
#     f = 1 + w * (2**PREC - span_h) // sum(w),  the remainder to the first largest w.
# Measured on the calibrated levels' real chunks, 12-bit tables cost 0.03% over the
# unquantised models, and a table is cheap to rebuild for every cluster of a chunk.
# The stream is the C coder's (``_rans.c``): 4 interleaved 32-bit rANS states,
# 16-bit words, elements in cluster order, rows in order, tokens in order.
RANS_PREC = _rans.PREC
RANS_MAX_SPAN_H = _rans.MAX_SPAN_H


_RANS_BATCH_CELLS = 1 << 20  # model values weighed at once (bounds memory on hostile side info)


def _rans_tables(c_frac, c_sidx, c_shape, c_lo, c_span):
    """Per cluster (int64 arrays): ``(raw, span_h, flat uint16 frequencies, offsets)``.

    Vectorised over clusters, a batch at a time: a chunk's clusters usually weigh a
    few ten thousand values in all, but side info may declare up to 65,536 per
    cluster, and memory must not follow it."""
    c_span = c_span.astype(np.int64)
    raw = np.zeros(c_span.size, np.int64)
    while ((((c_span - 1) >> raw) + 1) > RANS_MAX_SPAN_H).any():
        raw += (((c_span - 1) >> raw) + 1) > RANS_MAX_SPAN_H
    span_h = ((c_span - 1) >> raw) + 1
    foff = np.zeros(c_span.size, np.int64)
    np.cumsum(span_h[:-1], out=foff[1:])
    ends = np.cumsum(c_span)
    parts, start = [], 0
    while start < c_span.size:
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - c_span[start] + _RANS_BATCH_CELLS, "right")))
        sel = slice(start, stop)
        parts.append(_rans_freqs(c_frac[sel], c_sidx[sel], c_shape[sel], c_lo[sel], c_span[sel], raw[sel],
                                 span_h[sel]))
        start = stop
    freqs = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return raw, span_h, freqs, foff


def _rans_freqs(c_frac, c_sidx, c_shape, c_lo, c_span, raw, span_h) -> np.ndarray:
    """The clusters' frequency tables, concatenated (see the "rans" notes)."""
    clusters = np.arange(c_span.size)
    rid, kk, _ = _ragged(c_span, clusters)
    w = _param_weights(kk + c_lo[rid], c_frac[rid], c_sidx[rid], c_shape[rid])
    foff = np.zeros(c_span.size, np.int64)
    np.cumsum(span_h[:-1], out=foff[1:])
    total_h = int(span_h.sum())
    if raw.any():  # sum each run of 2**raw values into its h
        wh = np.bincount(foff[rid] + (kk >> raw[rid]), weights=w, minlength=total_h)
        w = np.rint(wh).astype(np.int64)  # sums of at most 32 integers below 2**16: exact
        rid = np.repeat(clusters, span_h)
    total = 1 << RANS_PREC
    sums = np.add.reduceat(w, foff)
    f = 1 + (w * (total - span_h[rid])) // sums[rid]
    top = np.maximum.reduceat(w, foff)
    pos = np.arange(total_h)
    first_top = np.minimum.reduceat(np.where(w == top[rid], pos, total_h), foff)
    f[first_top] += total - np.add.reduceat(f, foff)
    return f.astype(np.uint16)


def _rans_model(c_frac, c_sidx, c_shape, c_lo, c_span, rows_by_c, bounds):
    """What the C coder takes besides the symbols, the same for encoder and decoder:
    ``(frequencies, [nc, 6] int64 cluster table, coded rows in cluster order)``
    (see ``_rans.c``)."""
    raw, span_h, freqs, foff = _rans_tables(c_frac, c_sidx, c_shape, c_lo, c_span)
    params = np.stack([span_h, foff, raw, np.diff(bounds), bounds[:-1], c_lo], axis=1)
    return freqs, np.ascontiguousarray(params, dtype=np.int64), rows_by_c[: bounds[-1]].astype(np.int32)


def _clustered_rows(cid, nc):
    """Row numbers sorted by cluster (constant rows last) and each cluster's bounds in them."""
    rows_by_c = np.argsort(cid, kind="stable")
    return rows_by_c, np.searchsorted(cid[rows_by_c], np.arange(nc + 1))


class RangeCoder(SymbolCoder):
    """Entropy coder with one categorical model per matrix row (or cluster of rows):
    constriction's range/ANS coders, or kvzip's rANS coder for ``rans``."""

    def __init__(self, family: str = "param"):
        if family not in FAMILIES:
            raise CodecError(f"entropy family must be one of {', '.join(FAMILIES)}, got {family!r}")
        self.family = family
        self.releases_gil = family == "rans"  # constriction holds the GIL while it decodes

    @staticmethod
    def _fit_param(hist, lo, bounds, n):
        """Choose (mu4, sidx, shape) per coded row minimising its code length.

        Row r's histogram is ``hist[bounds[r]:bounds[r + 1]]`` over the values
        ``lo[r], lo[r] + 1, ...``.  mu4 = round(4 * mean); each shape is tried at
        five scales around its moment estimate, and the code length is the one
        under the decoder's integer weights (|4k - mu4| divided exactly, see the
        note at ``_S_FIXED_F``).  Encoder only, in C (``_rans.fit_param``)."""
        rows = lo.size
        mu4, sidx, shape = (np.empty(rows, np.int64) for _ in range(3))
        _rans.fit_param(hist, np.ascontiguousarray(lo, np.int64), bounds, _BETAS_F, _POWERS, _GG_F, _LOG2_GG, _S_FIXED_F,
                        mu4, sidx, shape, n)
        return mu4, sidx, shape

    @staticmethod
    def _code_rows(coder, coded, span, offs, wflat, n, matrix=None, lo=None, out=None):
        """Encode (``matrix`` given) or decode into ``out`` the coded rows, in row order."""
        wf = wflat.astype(np.float64)
        ends = offs + span[coded]
        for j, r in enumerate(coded.tolist()):
            model = _Categorical(wf[offs[j] : ends[j]], perfect=False)
            if out is None:
                coder.encode((matrix[r] - lo[r]).astype(np.int32), model)
            else:
                out[r] += coder.decode(model, n)

    # ---- "param": rows sharing quantised model parameters share one model ------
    # Rows are re-centred on floor(mu); rows whose (mu fraction, s, shape) agree
    # are concatenated and coded with one model, in pairs of symbols when the
    # alphabet is small: a few hundred decode calls per chunk instead of one per
    # row, and half as many coded symbols.
    def _encode_clustered(self, matrix, lo, span, coded, hist, bounds):
        g, n = matrix.shape
        mu4, sidx, shape = self._fit_param(hist, lo[coded], bounds, n)
        center = lo.copy()  # constant rows: their value
        center[coded] = mu4 >> 2
        frac = mu4 & 3
        key = (frac * 256 + sidx) * len(BETAS) + shape
        ukeys, inv = np.unique(key, return_inverse=True)
        cid = np.full(g, _CONST_ROW, np.int64)
        cid[coded] = inv
        rel_lo = lo[coded] - center[coded]
        rel_hi = rel_lo + span[coded] - 1
        nc = ukeys.size
        c_lo = np.full(nc, np.iinfo(np.int64).max)
        c_hi = np.full(nc, np.iinfo(np.int64).min)
        np.minimum.at(c_lo, inv, rel_lo)
        np.maximum.at(c_hi, inv, rel_hi)
        if self.family == "param2":  # windows on a coarse grid, so models recur across chunks
            r_lo, r_hi = -_round_window(-c_lo), _round_window(c_hi)
            fits = r_hi - r_lo < MAX_SPAN
            c_lo, c_hi = np.where(fits, r_lo, c_lo), np.where(fits, r_hi, c_hi)
        c_span = c_hi - c_lo + 1
        if nc and int(c_span.max()) > MAX_SPAN:
            raise CodecError(f"symbol range exceeds {MAX_SPAN}; step too fine")
        c_shape = ukeys % len(BETAS)
        c_sidx = (ukeys // len(BETAS)) % 256
        c_frac = ukeys // (len(BETAS) * 256)
        parts = [
            struct.pack("<I", nc),
            center.astype("<i4").tobytes(),
            cid.astype("<u2").tobytes(),
            c_frac.astype(np.uint8).tobytes(), c_sidx.astype(np.uint8).tobytes(),
            c_shape.astype(np.uint8).tobytes(),
            c_lo.astype("<i4").tobytes(), c_span.astype("<i4").tobytes(),
        ]
        rows_by_c, bounds = _clustered_rows(cid, nc)
        if self.family == "rans":  # the C coder reads the symbols from the matrix itself
            if not nc:  # every row constant: nothing to code
                return b"".join(parts), np.zeros(0, np.uint16), b""
            freqs, params, rows = _rans_model(c_frac, c_sidx, c_shape, c_lo, c_span, rows_by_c, bounds)
            try:
                words = _rans.encode(matrix, freqs, params, rows, center.astype(np.int32), n)
            except ValueError as exc:
                raise CodecError(f"rans encoder: {exc}") from None
            return b"".join(parts), np.frombuffer(words, "<u2"), b""
        syms = []
        for c in range(nc):
            rows = rows_by_c[bounds[c] : bounds[c + 1]]
            syms.append((matrix[rows] - center[rows][:, None] - c_lo[c]).ravel())
        if self.family == "param2":
            return self._encode_v2(parts, syms, c_frac, c_sidx, c_shape, c_lo, c_span)
        enc = _RangeEncoder()
        for c in range(nc):
            self._code_cluster(enc, syms[c], c_frac[c], c_sidx[c], c_shape[c], c_lo[c], c_span[c])
        return b"".join(parts), enc.get_compressed(), b""

    @staticmethod
    def _encode_v2(parts, syms, c_frac, c_sidx, c_shape, c_lo, c_span):
        nc = len(syms)
        c_raw = np.zeros(nc, np.int64)
        c_tup = np.ones(nc, np.int64)
        todo = []  # (symbols, model) in decode order
        planes = []
        for c in range(nc):
            frac, sidx, shape, lo, span = (int(v[c]) for v in (c_frac, c_sidx, c_shape, c_lo, c_span))
            sym = syms[c]
            w = _model_weights(frac, sidx, shape, lo, span).astype(np.float64)
            raw, tup = _choose_layout(np.bincount(sym, minlength=span).astype(np.float64), w, span)
            c_raw[c], c_tup[c] = raw, tup
            tmodel, _, single, _ = _cluster_models2(frac, sidx, shape, lo, span, raw, tup)
            h = sym >> raw
            if raw:
                bits = ((sym[None, :] >> np.arange(raw)[:, None]) & 1).astype(np.uint8)
                planes.append(np.packbits(bits, axis=1, bitorder="little").tobytes())
            span_h = ((span - 1) >> raw) + 1
            m = sym.size
            nt = m // tup
            if tup > 1 and nt:
                t = h[: nt * tup].reshape(nt, tup)
                code = t[:, 0]
                for j in range(1, tup):
                    code = code * span_h + t[:, j]
                todo.append((code.astype(np.int32), tmodel))
            rest = h[nt * tup :] if tup > 1 else h
            if rest.size:
                todo.append((rest.astype(np.int32), single))
        enc = _AnsCoder()  # a stack: encode last-decoded first
        for sym, model in reversed(todo):
            enc.encode_reverse(sym, model)
        parts += [c_raw.astype(np.uint8).tobytes(), c_tup.astype(np.uint8).tobytes()]
        return b"".join(parts), enc.get_compressed(), b"".join(planes)

    def _code_cluster(self, coder, sym, frac, sidx, shape, lo, span):
        """Encode ``sym`` (0-based symbols of one cluster)."""
        single, pair, _ = _cluster_models(int(frac), int(sidx), int(shape), int(lo), int(span))
        m = sym.size
        npairs = m // 2 if pair is not None else 0
        if npairs:
            coder.encode((sym[0 : 2 * npairs : 2] * span + sym[1 : 2 * npairs : 2]).astype(np.int32), pair)
        if m > 2 * npairs:
            coder.encode(sym[2 * npairs :].astype(np.int32), single)

    @staticmethod
    def _side_rows(raw, g, per_cluster):
        """The part of a clustered layout's side info that ``param`` and ``param2`` share:
        ``(nc, center, cid, (frac, sidx, shape, lo, span), offset after them)``.  The
        side info's size must be exact; ``per_cluster`` is its bytes per cluster."""
        nc = struct.unpack_from("<I", raw, 0)[0]
        if len(raw) != 4 + 6 * g + per_cluster * nc:
            raise CodecError("entropy side info has the wrong size")
        center = np.frombuffer(raw, "<i4", g, 4).astype(np.int32)
        cid = np.frombuffer(raw, "<u2", g, 4 + 4 * g).astype(np.int64)
        pos = 4 + 6 * g
        frac, sidx, shape = (np.frombuffer(raw, np.uint8, nc, pos + i * nc).astype(np.int64) for i in range(3))
        lo = np.frombuffer(raw, "<i4", nc, pos + 3 * nc).astype(np.int64)
        span = np.frombuffer(raw, "<i4", nc, pos + 7 * nc).astype(np.int64)
        return nc, center, cid, (frac, sidx, shape, lo, span), pos + 11 * nc

    @staticmethod
    def _check_models(frac, shape, span, min_span):
        """Refuse cluster models outside what an encoder writes (a CodecError)."""
        if span.size and (span.min() < min_span or span.max() > MAX_SPAN or frac.max() > 3
                          or shape.max() >= len(BETAS)):
            raise CodecError("entropy side info has an invalid model")

    @staticmethod
    def _group_rows(center, cid, nc, g, n):
        """The output with its constant rows filled, and the coded rows grouped by
        cluster: ``(out, rows_by_c, bounds, sizes)`` (the last three None when no row is
        coded).  Unknown or unused clusters are a CodecError."""
        if ((cid >= nc) & (cid != _CONST_ROW)).any():
            raise CodecError("entropy side info names an unknown model")
        out = np.empty((g, n), np.int32)
        const = np.flatnonzero(cid == _CONST_ROW)
        out[const] = center[const][:, None]
        if not nc:
            return out, None, None, None
        rows_by_c, bounds = _clustered_rows(cid, nc)
        sizes = np.diff(bounds)
        if (sizes == 0).any():
            raise CodecError("entropy side info has an unused model")
        return out, rows_by_c, bounds, sizes

    def _decode_clustered(self, raw, words, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), _ = self._side_rows(raw, g, 11)
        self._check_models(c_frac, c_shape, c_span, 1)
        out, rows_by_c, bounds, sizes = self._group_rows(center, cid, nc, g, n)
        if not nc:
            return out
        # Clusters decode into one buffer in cluster order (a pair symbol is split by
        # one table lookup); then one pass adds each row's centre and one copies the
        # rows to their places.
        dec = _RangeDecoder(words)
        ncoded = int(bounds[nc])
        buf = np.empty((ncoded, n), np.int32)
        flat = buf.reshape(-1)
        params = np.stack([c_frac, c_sidx, c_shape, c_lo, c_span], axis=1).tolist()
        pos = 0
        for c, m in enumerate((sizes * n).tolist()):
            frac, sidx, shape, lo, span = params[c]
            single, pair, table = _cluster_models(frac, sidx, shape, lo, span)
            npairs = m // 2 if pair is not None else 0
            if npairs:
                np.take(table, dec.decode(pair, npairs), axis=0, mode="clip",
                        out=flat[pos : pos + 2 * npairs].reshape(npairs, 2))
            if m > 2 * npairs:
                np.add(dec.decode(single, m - 2 * npairs), np.int32(lo), out=flat[pos + 2 * npairs : pos + m])
            pos += m
        rows = rows_by_c[:ncoded]
        buf += center[rows][:, None]
        out[rows] = buf
        return out

    def _decode_clustered2(self, raw, words, planes, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), pos = self._side_rows(raw, g, 13)
        c_raw = np.frombuffer(raw, np.uint8, nc, pos).astype(np.int64)
        c_tup = np.frombuffer(raw, np.uint8, nc, pos + nc).astype(np.int64)
        self._check_models(c_frac, c_shape, c_span, 2)
        if nc:
            if c_raw.max() > MAX_RAW or c_tup.min() < 1 or c_tup.max() > MAX_TUP_DECODE:
                raise CodecError("entropy side info has an invalid model")
            span_h = ((c_span - 1) >> c_raw) + 1
            if span_h.min() < 2 or ((c_tup > 1) & (span_h.astype(np.float64) ** c_tup > MAX_ALPHA)).any():
                raise CodecError("entropy side info has an invalid symbol layout")
        out, rows_by_c, bounds, sizes = self._group_rows(center, cid, nc, g, n)
        if not nc:
            if planes.size:
                raise CodecError("entropy block lengths do not match its size")
            return out
        ms = sizes * n
        if int((c_raw * ((ms + 7) >> 3)).sum()) != planes.size:
            raise CodecError("entropy block lengths do not match its size")
        # As in "param": clusters decode into one buffer in cluster order (tables
        # turn coded tuples into (h << raw) + lo), low bits are added per cluster,
        # then one pass adds each row's centre and one copies rows to their places.
        dec = _AnsCoder(words)
        ncoded = int(bounds[nc])
        buf = np.empty((ncoded, n), np.int32)
        flat = buf.reshape(-1)
        params = np.stack([c_frac, c_sidx, c_shape, c_lo, c_span, c_raw, c_tup, ms], axis=1).tolist()
        pos = ppos = 0
        for frac, sidx, shape, lo, span, nraw, tup, m in params:
            tmodel, table, single, vals = _cluster_models2(frac, sidx, shape, lo, span, nraw, tup)
            nt = m // tup if tup > 1 else 0
            if nt:
                np.take(table, dec.decode(tmodel, nt), axis=0, mode="clip",
                        out=flat[pos : pos + nt * tup].reshape(nt, tup))
            if m > nt * tup:
                np.take(vals, dec.decode(single, m - nt * tup), mode="clip", out=flat[pos + nt * tup : pos + m])
            if nraw:
                nb = (m + 7) >> 3
                bits = np.unpackbits(planes[ppos : ppos + nraw * nb].reshape(nraw, nb), axis=1, count=m,
                                     bitorder="little")
                low = bits[0]
                for j in range(1, nraw):
                    low |= bits[j] << np.uint8(j)
                seg = flat[pos : pos + m]
                np.add(seg, low, out=seg)
                ppos += nraw * nb
            pos += m
        rows = rows_by_c[:ncoded]
        buf += center[rows][:, None]
        out[rows] = buf
        return out

    def _decode_rans(self, raw, words, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), _ = self._side_rows(raw, g, 11)
        self._check_models(c_frac, c_shape, c_span, 2)
        out, rows_by_c, bounds, sizes = self._group_rows(center, cid, nc, g, n)
        if not nc:
            if words.size:
                raise CodecError("entropy block lengths do not match its size")
            return out
        freqs, params, rows = _rans_model(c_frac, c_sidx, c_shape, c_lo, c_span, rows_by_c, bounds)
        _rans.decode(words, freqs, params, rows, center, out, n)
        return out

    def encode(self, matrix: np.ndarray) -> bytes:
        g, n = matrix.shape
        if matrix.size == 0:
            return _HEAD.pack(0, 0)
        lo = matrix.min(axis=1).astype(np.int64)
        hi = matrix.max(axis=1).astype(np.int64)
        if lo.min() < -(1 << 31) or hi.max() >= 1 << 31:
            raise CodecError("symbols exceed the 32-bit range; step too fine")
        matrix = np.ascontiguousarray(matrix, dtype=np.int32)
        span = hi - lo + 1
        if int(span.max()) > MAX_SPAN:
            raise CodecError(f"symbol range {int(span.max())} exceeds {MAX_SPAN}; step too fine")
        coded = np.flatnonzero(span > 1)
        bounds = np.zeros(coded.size + 1, np.int64)
        np.cumsum(span[coded], out=bounds[1:])
        hist = np.empty(int(bounds[-1]), np.float64)
        _rans.row_histograms(matrix, coded.astype(np.int32), lo[coded], bounds, hist, n)
        if self.family != "hist":
            side_raw, words, planes = self._encode_clustered(matrix, lo, span, coded, hist, bounds)
            side_bytes = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(side_raw)
            wb = words.astype("<u2" if self.family == "rans" else "<u4").tobytes()
            return _HEAD.pack(len(side_bytes), words.size) + side_bytes + wb + planes
        cols = [lo.astype("<i4").tobytes(), span.astype("<i4").tobytes()]
        q = np.where(hist > 0, np.rint(4 * np.log2(np.maximum(hist, 1))).astype(np.int64) + 1, 0)
        cols.append(q.astype(np.uint8).tobytes())
        side_bytes = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(b"".join(cols))
        enc = _RangeEncoder()
        self._code_rows(enc, coded, span, bounds[:-1], _hist_weights(q), n, matrix=matrix, lo=lo)
        words = enc.get_compressed().astype("<u4").tobytes()
        return _HEAD.pack(len(side_bytes), len(words) // 4) + side_bytes + words

    def decode(self, data: bytes, shape: tuple[int, int]) -> np.ndarray:
        g, n = shape
        if g * n == 0:
            return np.zeros(shape, np.int32)
        try:
            side_len, nwords = _HEAD.unpack_from(data, 0)
            end = _HEAD.size + side_len + (2 if self.family == "rans" else 4) * nwords
            if end > len(data) or (self.family != "param2" and end != len(data)):
                raise CodecError("entropy block lengths do not match its size")
            raw = zstd_decompress_bounded(
                data[_HEAD.size : _HEAD.size + side_len], g * (14 + MAX_SPAN), "entropy side info"
            )
            if self.family == "param":
                words = np.frombuffer(data, "<u4", nwords, _HEAD.size + side_len)
                return self._decode_clustered(raw, words, g, n)
            if self.family == "rans":
                return self._decode_rans(raw, np.frombuffer(data, "<u2", nwords, _HEAD.size + side_len), g, n)
            if self.family == "param2":
                words = np.frombuffer(data, "<u4", nwords, _HEAD.size + side_len)
                return self._decode_clustered2(raw, words, np.frombuffer(data, np.uint8, len(data) - end, end), g, n)
            if len(raw) < 8 * g:
                raise CodecError("entropy side info is truncated")
            lo = np.frombuffer(raw, "<i4", g, 0).astype(np.int64)
            span = np.frombuffer(raw, "<i4", g, 4 * g).astype(np.int64)
            if span.min() < 1 or span.max() > MAX_SPAN:
                raise CodecError("entropy side info has an invalid symbol span")
            coded = np.flatnonzero(span > 1)
            nc = coded.size
            pos = 8 * g
            rid, kk, offs = _ragged(span, coded)
            if len(raw) != pos + kk.size:
                raise CodecError("entropy side info has the wrong size")
            q = np.frombuffer(raw, np.uint8, kk.size, pos)
            if kk.size and q.max() > 4 * 48:
                raise CodecError("entropy side info has an invalid count code")
            wflat = _hist_weights(q)
            out = np.empty((g, n), np.int32)
            out[:] = lo.astype(np.int32)[:, None]
            if nc:
                words = np.frombuffer(data, "<u4", nwords, _HEAD.size + side_len)
                self._code_rows(_RangeDecoder(words), coded, span, offs, wflat, n, out=out)
            return out
        except CodecError:
            raise
        except Exception as exc:
            # Untrusted bytes meet third-party coders here (constriction asserts on data its
            # model cannot have produced, numpy and zstd raise their own types): whatever they
            # raise is a corrupt block, reported as kvzip's own error.
            raise CodecError(f"corrupt entropy-coded block ({type(exc).__name__}: {exc})") from None
