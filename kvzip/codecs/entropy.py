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

Decoder determinism: the probabilities handed to constriction must be bit-identical
on every machine, so both families turn their side information into *integer*
weights with integer arithmetic and small constant tables (no per-symbol libm
calls).  Rows whose span is 1 are constant and cost no coded bits.

Speed: decoding is one ``RangeDecoder.decode(model, n)`` call per row (no per-symbol
Python); constriction itself runs at roughly 30-50 M symbols/s on one core.
"""

from __future__ import annotations

import functools
import math
import struct

import constriction
import numpy as np
import zstandard

from kvzip.codecs.base import zstd_decompress_bounded
from kvzip.codecs.stages import SymbolCoder
from kvzip.errors import CodecError

_Categorical = constriction.stream.model.Categorical
_RangeEncoder = constriction.stream.queue.RangeEncoder
_RangeDecoder = constriction.stream.queue.RangeDecoder

MAX_SPAN = 1 << 16  # widest alphabet one row may use
_ZSTD_LEVEL = 9
_HEAD = struct.Struct("<II")  # side-info length, number of uint32 code words

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


class RangeCoder(SymbolCoder):
    """constriction range coder with one categorical model per matrix row."""

    def __init__(self, family: str = "param"):
        if family not in ("hist", "param"):
            raise CodecError(f"entropy family must be 'hist' or 'param', got {family!r}")
        self.family = family

    @staticmethod
    def _fit_param(hist, rid, k, n):
        """Choose (mu4, sidx, shape) per coded row minimising its code length.

        ``hist``/``rid``/``k`` describe the rows' histograms in the flat layout."""
        rows = int(rid[-1]) + 1 if rid.size else 0
        mean = np.bincount(rid, hist * k, rows) / n
        mu4 = np.rint(4 * mean).astype(np.int64)
        best = np.full(rows, np.inf)
        sidx = np.zeros(rows, np.int64)
        shape = np.zeros(rows, np.int64)
        dev = np.abs(k - mu4[rid] / 4.0)
        for si, beta in enumerate(BETAS):
            s0 = np.maximum((beta * np.bincount(rid, hist * dev**beta, rows) / n) ** (1 / beta), 1 / 16)
            c0 = np.rint(8 * np.log2(s0)).astype(np.int64) + _S_OFFSET
            for dc in (-2, -1, 0, 1, 2):
                cand = np.clip(c0 + dc, 0, 255)
                w = _param_weights(k, mu4[rid], cand[rid], np.full(rid.size, si)).astype(np.float64)
                cost = n * np.log2(np.bincount(rid, w, rows)) - np.bincount(rid, hist * np.log2(w), rows)
                better = cost < best
                best = np.where(better, cost, best)
                sidx = np.where(better, cand, sidx)
                shape = np.where(better, si, shape)
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
    def _encode_clustered(self, matrix, lo, span, coded, hist, rid, kk):
        g, n = matrix.shape
        mu4, sidx, shape = self._fit_param(hist, rid, kk + lo[coded][rid], n)
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
        c_span = c_hi - c_lo + 1
        if nc and int(c_span.max()) > MAX_SPAN:
            raise CodecError(f"symbol range exceeds {MAX_SPAN}; step too fine")
        c_shape = ukeys % len(BETAS)
        c_sidx = (ukeys // len(BETAS)) % 256
        c_frac = ukeys // (len(BETAS) * 256)
        side = b"".join([
            struct.pack("<I", nc),
            center.astype("<i4").tobytes(),
            cid.astype("<u2").tobytes(),
            c_frac.astype(np.uint8).tobytes(), c_sidx.astype(np.uint8).tobytes(),
            c_shape.astype(np.uint8).tobytes(),
            c_lo.astype("<i4").tobytes(), c_span.astype("<i4").tobytes(),
        ])
        enc = _RangeEncoder()
        rows_by_c = np.argsort(cid, kind="stable")
        bounds = np.searchsorted(cid[rows_by_c], np.arange(nc + 1))
        for c in range(nc):
            rows = rows_by_c[bounds[c] : bounds[c + 1]]
            sym = (matrix[rows] - center[rows][:, None] - c_lo[c]).ravel()
            self._code_cluster(enc, sym, c_frac[c], c_sidx[c], c_shape[c], c_lo[c], c_span[c])
        return side, enc.get_compressed()

    def _code_cluster(self, coder, sym, frac, sidx, shape, lo, span):
        """Encode ``sym`` (0-based symbols of one cluster)."""
        single, pair, _ = _cluster_models(int(frac), int(sidx), int(shape), int(lo), int(span))
        m = sym.size
        npairs = m // 2 if pair is not None else 0
        if npairs:
            coder.encode((sym[0 : 2 * npairs : 2] * span + sym[1 : 2 * npairs : 2]).astype(np.int32), pair)
        if m > 2 * npairs:
            coder.encode(sym[2 * npairs :].astype(np.int32), single)

    def _decode_clustered(self, raw, words, g, n):
        nc = struct.unpack_from("<I", raw, 0)[0]
        if len(raw) != 4 + 6 * g + 11 * nc:
            raise CodecError("entropy side info has the wrong size")
        pos = 4
        center = np.frombuffer(raw, "<i4", g, pos).astype(np.int32)
        cid = np.frombuffer(raw, "<u2", g, pos + 4 * g).astype(np.int64)
        pos += 6 * g
        c_frac = np.frombuffer(raw, np.uint8, nc, pos).astype(np.int64)
        c_sidx = np.frombuffer(raw, np.uint8, nc, pos + nc).astype(np.int64)
        c_shape = np.frombuffer(raw, np.uint8, nc, pos + 2 * nc).astype(np.int64)
        c_lo = np.frombuffer(raw, "<i4", nc, pos + 3 * nc).astype(np.int64)
        c_span = np.frombuffer(raw, "<i4", nc, pos + 7 * nc).astype(np.int64)
        if nc and (c_span.min() < 1 or c_span.max() > MAX_SPAN or c_frac.max() > 3
                   or c_shape.max() >= len(BETAS)):
            raise CodecError("entropy side info has an invalid model")
        if ((cid >= nc) & (cid != _CONST_ROW)).any():
            raise CodecError("entropy side info names an unknown model")
        out = np.empty((g, n), np.int32)
        const = np.flatnonzero(cid == _CONST_ROW)
        out[const] = center[const][:, None]
        if not nc:
            return out
        rows_by_c = np.argsort(cid, kind="stable")
        bounds = np.searchsorted(cid[rows_by_c], np.arange(nc + 1))
        sizes = np.diff(bounds)
        if (sizes == 0).any():
            raise CodecError("entropy side info has an unused model")
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

    def encode(self, matrix: np.ndarray) -> bytes:
        matrix = np.ascontiguousarray(matrix, dtype=np.int64)
        g, n = matrix.shape
        if matrix.size == 0:
            return _HEAD.pack(0, 0)
        lo = matrix.min(axis=1)
        span = matrix.max(axis=1) - lo + 1
        if int(span.max()) > MAX_SPAN:
            raise CodecError(f"symbol range {int(span.max())} exceeds {MAX_SPAN}; step too fine")
        coded = np.flatnonzero(span > 1)
        rid, kk, offs = _ragged(span, coded)
        cell = matrix[coded] - lo[coded][:, None] + offs[:, None]
        hist = np.bincount(cell.ravel(), minlength=kk.size).astype(np.float64)
        if self.family == "param":
            side_raw, words = self._encode_clustered(matrix, lo, span, coded, hist, rid, kk)
            side_bytes = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(side_raw)
            wb = words.astype("<u4").tobytes()
            return _HEAD.pack(len(side_bytes), len(wb) // 4) + side_bytes + wb
        cols = [lo.astype("<i4").tobytes(), span.astype("<i4").tobytes()]
        if False:
            pass
        else:
            q = np.where(hist > 0, np.rint(4 * np.log2(np.maximum(hist, 1))).astype(np.int64) + 1, 0)
            cols.append(q.astype(np.uint8).tobytes())
            wflat = _hist_weights(q)
        side_bytes = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(b"".join(cols))
        enc = _RangeEncoder()
        self._code_rows(enc, coded, span, offs, wflat, n, matrix=matrix, lo=lo)
        words = enc.get_compressed().astype("<u4").tobytes()
        return _HEAD.pack(len(side_bytes), len(words) // 4) + side_bytes + words

    def decode(self, data: bytes, shape: tuple[int, int]) -> np.ndarray:
        g, n = shape
        if g * n == 0:
            return np.zeros(shape, np.int32)
        try:
            side_len, nwords = _HEAD.unpack_from(data, 0)
            if _HEAD.size + side_len + 4 * nwords != len(data):
                raise CodecError("entropy block lengths do not match its size")
            raw = zstd_decompress_bounded(
                data[_HEAD.size : _HEAD.size + side_len], g * (14 + MAX_SPAN), "entropy side info"
            )
            if self.family == "param":
                words = np.frombuffer(data, "<u4", nwords, _HEAD.size + side_len)
                return self._decode_clustered(raw, words, g, n)
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
        except (ValueError, TypeError, struct.error, zstandard.ZstdError, OverflowError, IndexError,
                RuntimeError, MemoryError) as exc:
            raise CodecError(f"corrupt entropy-coded block: {exc}") from None
