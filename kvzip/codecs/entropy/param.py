"""``param``: a discretised generalised Gaussian per cluster of rows.

The model ``exp(-(|k - mu| / s) ** beta)`` has mu on a 1/4 grid, s on a 1/8-octave grid
and beta from a fixed set: a few bytes per cluster, chosen by the encoder to minimise the
real code length (``_common.cluster_rows``).  Each cluster's rows are concatenated and
coded with constriction's range coder, in pairs of symbols when the alphabet is small: a
few hundred decode calls per chunk instead of one per row, and half as many coded
symbols.  The first lossy levels' default; the v1 golden ``golden_lossy_*.kvz`` files
hold it.  Bitstream in docs/format.md.
"""

from __future__ import annotations

import functools

import constriction
import numpy as np

from kvzip.codecs.entropy._common import (
    EntropyLayout,
    Rows,
    _param_weights,
    check_cluster_models,
    cluster_rows,
    group_rows,
    parse_cluster_side,
    place_clusters,
)

_Categorical = constriction.stream.model.Categorical
_RangeEncoder = constriction.stream.queue.RangeEncoder
_RangeDecoder = constriction.stream.queue.RangeDecoder

_PAIR_MAX_SPAN = 40  # code symbol pairs when the alphabet is at most this wide


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


def _code_cluster(coder, sym, frac, sidx, shape, lo, span):
    """Encode ``sym`` (0-based symbols of one cluster)."""
    single, pair, _ = _cluster_models(int(frac), int(sidx), int(shape), int(lo), int(span))
    m = sym.size
    npairs = m // 2 if pair is not None else 0
    if npairs:
        coder.encode((sym[0 : 2 * npairs : 2] * span + sym[1 : 2 * npairs : 2]).astype(np.int32), pair)
    if m > 2 * npairs:
        coder.encode(sym[2 * npairs :].astype(np.int32), single)


class ParamLayout(EntropyLayout):
    name = "param"

    @classmethod
    def clear_caches(cls) -> None:
        _cluster_models.cache_clear()

    def _encode(self, rows: Rows):
        cl = cluster_rows(rows)
        enc = _RangeEncoder()
        for c, sym in enumerate(cl.symbols(rows.matrix)):
            _code_cluster(enc, sym, cl.frac[c], cl.sidx[c], cl.shape[c], cl.lo[c], cl.span[c])
        return cl.side_info(), enc.get_compressed(), b""

    def _decode(self, side, words, tail, g, n):
        nc, center, cid, (c_frac, c_sidx, c_shape, c_lo, c_span), _ = parse_cluster_side(side, g, 11)
        check_cluster_models(c_frac, c_shape, c_span, 1, g, n)
        out, rows_by_c, bounds, sizes = group_rows(center, cid, nc, g, n)
        if not nc:
            return out
        # Clusters decode into one buffer in cluster order (a pair symbol is split by
        # one table lookup); then one pass adds each row's centre and one copies the
        # rows to their places.
        dec = _RangeDecoder(words)
        buf = np.empty((int(bounds[nc]), n), np.int32)
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
        return place_clusters(out, buf, rows_by_c, center)
