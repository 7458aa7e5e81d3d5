"""``param2``: the ``param`` models, laid out for decode speed.

Per cluster the encoder picks ``raw`` low bits and a tuple size ``tup``: each 0-based
symbol s splits as s = (h << raw) | b; b is stored verbatim in bit planes (np.packbits)
and h is coded ``tup`` symbols at a time with the product model over span_h ** tup
values (span_h = ceil(span / 2 ** raw)), its weights the cluster's integer weights summed
over b.  constriction's cost per coded symbol is a fixed part plus a binary search over
the alphabet, so tuples amortise the fixed part and raw bits shorten the search; when
step << sigma the low bits are nearly uniform; the encoder takes the most low bits that
cost at most _RAW_SLACK bits per element in that cluster.  Cluster windows
[lo, lo + span) are rounded out to a coarse grid so the same models recur across chunks
and layers (a model costs tens of microseconds to build; they are cached per process).
The coded stream is constriction's ANS coder (a stack: the encoder pushes clusters in
reverse), a few per cent faster to decode than the range coder; then the bit planes, per
cluster ``raw`` planes of ceil(m / 8) bytes (little-endian bit order).

Measured on the lossy levels (benchmarks/decode_speed.py): ~+15% decode speed for
``high`` at +0.2% bits; triples (tup 3) and a 1024-value alphabet cap were slower.  The
calibrated levels' default before ``rans``; the v1 golden ``golden_profile_f32.kvz``
holds it.  Bitstream in docs/format.md.
"""

from __future__ import annotations

import functools

import constriction
import numpy as np

from kvzip.codecs.entropy._common import (
    _R8,
    MAX_SPAN,
    EntropyLayout,
    Rows,
    _param_weights,
    check_cluster_models,
    cluster_rows,
    group_rows,
    parse_cluster_side,
    place_clusters,
)
from kvzip.errors import CodecError

_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder

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
    """constriction models of one cluster: (tuple model, tuple table, single model,
    single table).  Tables map a coded symbol to ``tup`` (resp. one) values
    ``(h << raw) + lo``, ready for the low bits and the row centre."""
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


def _round_windows(c_lo: np.ndarray, c_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster windows on the coarse grid, so models recur across chunks (where the
    rounded window still fits MAX_SPAN)."""
    r_lo, r_hi = -_round_window(-c_lo), _round_window(c_hi)
    fits = r_hi - r_lo < MAX_SPAN
    return np.where(fits, r_lo, c_lo), np.where(fits, r_hi, c_hi)


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


class Param2Layout(EntropyLayout):
    name = "param2"
    trailing = True  # the bit planes follow the words

    @classmethod
    def clear_caches(cls) -> None:
        for f in (_cluster_models2, _weights_around, _tuple_digits):
            f.cache_clear()

    def _encode(self, rows: Rows):
        cl = cluster_rows(rows, _round_windows)
        nc = cl.nc
        c_raw = np.zeros(nc, np.int64)
        c_tup = np.ones(nc, np.int64)
        todo = []  # (symbols, model) in decode order
        planes = []
        for c, sym in enumerate(cl.symbols(rows.matrix)):
            frac, sidx, shape, lo, span = (int(v[c]) for v in (cl.frac, cl.sidx, cl.shape, cl.lo, cl.span))
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
        side = cl.side_info() + c_raw.astype(np.uint8).tobytes() + c_tup.astype(np.uint8).tobytes()
        return side, enc.get_compressed(), b"".join(planes)

    def _decode(self, side, words, planes, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), pos = parse_cluster_side(side, g, 13)
        c_raw = np.frombuffer(side, np.uint8, nc, pos).astype(np.int64)
        c_tup = np.frombuffer(side, np.uint8, nc, pos + nc).astype(np.int64)
        check_cluster_models(c_frac, c_shape, c_span, 2, g, n)
        if nc:
            if c_raw.max() > MAX_RAW or c_tup.min() < 1 or c_tup.max() > MAX_TUP_DECODE:
                raise CodecError("entropy side info has an invalid model")
            span_h = ((c_span - 1) >> c_raw) + 1
            if span_h.min() < 2 or ((c_tup > 1) & (span_h.astype(np.float64) ** c_tup > MAX_ALPHA)).any():
                raise CodecError("entropy side info has an invalid symbol layout")
        out, rows_by_c, bounds, sizes = group_rows(center, cid, nc, g, n)
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
        buf = np.empty((int(bounds[nc]), n), np.int32)
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
        return place_clusters(out, buf, rows_by_c, center)
