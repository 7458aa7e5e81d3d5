"""``rans``: the ``param`` models and side info, coded by kvzip's own C coder.

Each cluster's model becomes a frequency table over span_h = ceil(span / 2**raw) values
summing to 2**PREC (PREC = 12), with raw the fewest low bits that make
span_h <= 2**(PREC - 1); the low bits are then coded as uniform symbols.  The
quantisation is integer arithmetic, so every machine derives the same tables:
    f = 1 + w * (2**PREC - span_h) // sum(w),  the remainder to the first largest w.
Measured on the calibrated levels' real chunks, 12-bit tables cost 0.03% over the
unquantised models, and a table is cheap to rebuild for every cluster of a chunk.
The stream is the C coder's (``kvzip/codecs/_rans.c``): 4 interleaved 32-bit rANS
states, 16-bit words, elements in cluster order, rows in order, tokens in order.  One
call per chunk that runs without the GIL, about ten times faster than constriction.
The current levels' default; the v1 golden ``golden_profile_rans_f32.kvz`` holds it.
Bitstream in docs/format.md, decoded independently in tests/test_rans.py.
"""

from __future__ import annotations

import numpy as np

from kvzip.codecs import _rans
from kvzip.codecs.entropy._common import (
    _CONST_ROW,
    EntropyLayout,
    Rows,
    _param_weights,
    _ragged,
    check_cluster_models,
    cluster_rows,
    group_rows,
    parse_cluster_side,
)
from kvzip.errors import CodecError

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
    """The clusters' frequency tables, concatenated (see the module notes)."""
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


class RansLayout(EntropyLayout):
    name = "rans"
    releases_gil = True  # the C coder decodes a whole block without the GIL
    word = np.dtype("<u2")

    def _encode(self, rows: Rows):
        cl = cluster_rows(rows)
        side = cl.side_info()
        if not cl.nc:  # every row constant: nothing to code
            return side, np.zeros(0, np.uint16), b""
        freqs, params, coded = _rans_model(cl.frac, cl.sidx, cl.shape, cl.lo, cl.span, cl.rows_by_c, cl.bounds)
        try:  # the C coder reads the symbols from the matrix itself
            words = _rans.encode(rows.matrix, freqs, params, coded, cl.center.astype(np.int32), rows.matrix.shape[1])
        except ValueError as exc:
            raise CodecError(f"rans encoder: {exc}") from None
        return side, np.frombuffer(words, "<u2"), b""

    def _decode(self, side, words, tail, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), _ = parse_cluster_side(side, g, 11)
        check_cluster_models(c_frac, c_shape, c_span, 2, g, n)
        out, rows_by_c, bounds, sizes = group_rows(center, cid, nc, g, n)
        if not nc:
            if words.size:
                raise CodecError("entropy block lengths do not match its size")
            return out
        freqs, params, rows = _rans_model(c_frac, c_sidx, c_shape, c_lo, c_span, rows_by_c, bounds)
        _rans.decode(words, freqs, params, rows, center, out, n)
        return out

    def code_lengths(self, data: bytes, shape: tuple[int, int]) -> np.ndarray | None:
        """Per element: PREC - log2(its high part's frequency) + raw (its uniform low bits);
        a constant row costs nothing.  Sums to the stream's length but for the coder's
        final states (16 bytes a block)."""
        g, n = shape
        if g * n == 0:
            return np.zeros(shape)

        def lengths() -> np.ndarray:
            side, words, tail = self._parts(data, g, n)
            matrix = self._decode(side, words, tail, g, n)
            nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), _ = parse_cluster_side(side, g, 11)
            bits = np.zeros((g, n))
            if not nc:
                return bits
            raw, _, freqs, foff = _rans_tables(c_frac, c_sidx, c_shape, c_lo, c_span)
            coded = np.flatnonzero(cid != _CONST_ROW)
            c = cid[coded][:, None]
            high = (matrix[coded].astype(np.int64) - center[coded][:, None] - c_lo[c]) >> raw[c]
            bits[coded] = RANS_PREC - np.log2(freqs[foff[c] + high].astype(np.float64)) + raw[c]
            return bits

        return self._guarded(lengths)
