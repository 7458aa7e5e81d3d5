"""What the entropy layouts share.

* The block frame (``u32 side_len, u32 nwords``, a zstd frame of side info, the coded
  words, and for some layouts bytes after them) and :class:`EntropyLayout`, the one
  interface every layout implements: it frames, bounds the side info's size, and turns
  whatever a third-party decoder raises on corrupt bytes into a CodecError.
* An encoder's per-row statistics (:func:`row_stats`).
* The parametric model of ``param``, ``param2`` and ``rans``: the integer weights of a
  discretised generalised Gaussian, the encoder's fit, the grouping of rows into
  clusters of one model, and the parsing and checks of that clustered side info.

The bitstreams are specified in docs/format.md ("Entropy layouts").  Decoder
determinism: every layout turns its side info into *integer* weights with integer
arithmetic and small constant tables (no per-symbol libm calls), so every machine
derives the same probabilities.
"""

from __future__ import annotations

import math
import struct
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zstandard

from kvzip.codecs import _rans
from kvzip.codecs.stages import SymbolCoder
from kvzip.compression import zstd_decompress_bounded
from kvzip.errors import CodecError

MAX_SPAN = 1 << 16  # widest alphabet one row may use
# The most model values a block's clusters may declare in all, beyond one per element: the
# decoders weigh every value of every window before the first word, so without a bound a
# few KB of side info (every cluster at MAX_SPAN) cost minutes.  Measured on honest files
# (SmolLM2-135M, GPL-3, every level, with and without importance classes), the widest
# block is a sink block at `high` by importance: 308,927 values for 46,080 elements, 263 K
# over; the bound leaves 8x that.  Encoder and decoder apply the same rule.
SPAN_SLACK = 1 << 21
_ZSTD_LEVEL = 9
_HEAD = struct.Struct("<II")  # side-info length, number of code words

# 2 ** (r / 4) * 4096 and 2 ** (r / 8) * 65536, rounded: exact integer tables.
_R4 = np.array([4096, 4871, 5793, 6889], dtype=np.int64)
_R8 = np.array([65536, 71468, 77936, 84990, 92682, 101070, 110218, 120194], dtype=np.int64)

# Generalised-Gaussian shapes and their weight tables, indexed by floor(16 * |k-mu| / s).
BETAS = (0.6, 1.0, 1.5, 2.0)
_U_RES = 16
_U_LEN = 64 * _U_RES


def _gg_table(beta: float) -> np.ndarray:
    # 1024 values rounded at 2**16 scale, computed once: a libm difference of a few
    # ulp cannot move a value across a rounding boundary in practice (docs/format.md
    # gives the tables' digest; tests/test_entropy_layouts.py checks it).
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


# ---- the interface ---------------------------------------------------------------------
@dataclass
class Rows:
    """An encoder's view of a non-empty symbol matrix: the matrix as C-contiguous int32,
    each row's ``lo`` and ``span`` (int64), the rows that need coding (span > 1), and
    their histograms: row ``coded[j]``'s counts of ``lo, lo + 1, ...`` are
    ``hist[bounds[j]:bounds[j + 1]]`` (float64)."""

    matrix: np.ndarray
    lo: np.ndarray
    span: np.ndarray
    coded: np.ndarray
    bounds: np.ndarray
    hist: np.ndarray


def row_stats(matrix: np.ndarray) -> Rows:
    """:class:`Rows` of a matrix with at least one element; symbols outside 32 bits or
    a row wider than MAX_SPAN values are a CodecError (the quantiser's step is too fine)."""
    n = matrix.shape[1]
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
    return Rows(matrix, lo, span, coded, bounds, hist)


class EntropyLayout(SymbolCoder):
    """One entropy layout: a symbol matrix (int32, ``g`` rows by ``n`` tokens, one model
    per row or per cluster of rows) to one self-contained block of bytes, and back.

    A block is ``u32 side_len, u32 nwords``, then ``side_len`` bytes of one zstd frame
    holding the side info (which must declare its size, at most ``g * (14 + MAX_SPAN)``),
    then ``nwords`` code words of ``word``, then (only where ``trailing``) the layout's
    own bytes.  A subclass sets the class attributes and writes :meth:`_encode` and
    :meth:`_decode`; this class frames, bounds and maps errors, so every layout refuses
    corrupt input the same way: with a CodecError, whatever a third-party decoder raised.
    """

    name: ClassVar[str]  # the codec configs' ``entropy`` value
    releases_gil: ClassVar[bool] = False  # constriction holds the GIL while it decodes
    word: ClassVar[np.dtype] = np.dtype("<u4")  # one word of the coded stream
    trailing: ClassVar[bool] = False  # whether the layout's own bytes follow the words

    @property
    def family(self) -> str:
        """The name ``RangeCoder`` gave the layout (fuzz/ reads it)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @classmethod
    def clear_caches(cls) -> None:
        """Forget the layout's cached models (see ``clear_model_caches``)."""

    @abstractmethod
    def _encode(self, rows: Rows) -> tuple[bytes, np.ndarray, bytes]:
        """``(side info, code words, trailing bytes)`` of a non-empty matrix."""

    @abstractmethod
    def _decode(self, side: bytes, words: np.ndarray, tail: np.ndarray, g: int, n: int) -> np.ndarray:
        """The [g, n] int32 matrix from the block's parts; ``tail`` is empty unless ``trailing``."""

    def encode(self, matrix: np.ndarray) -> bytes:
        g, n = matrix.shape
        if matrix.size == 0:
            return _HEAD.pack(0, 0)
        side, words, tail = self._encode(row_stats(matrix))
        side_bytes = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(side)
        return _HEAD.pack(len(side_bytes), words.size) + side_bytes + words.astype(self.word).tobytes() + tail

    def decode(self, data: bytes, shape: tuple[int, int]) -> np.ndarray:
        g, n = shape
        if g * n == 0:
            return np.zeros(shape, np.int32)
        return self._guarded(lambda: self._decode(*self._parts(data, g, n), g, n))

    def code_lengths(self, data: bytes, shape: tuple[int, int]) -> np.ndarray | None:
        """Bits each element of the block's matrix costs under the block's own models
        (``[g, n]`` float64, the side info not counted), or None where the layout cannot
        say (``kvzip info`` splits a payload by importance class with it)."""
        return None

    def _parts(self, data: bytes, g: int, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(side info, code words, trailing bytes) of a block, its framing checked."""
        side_len, nwords = _HEAD.unpack_from(data, 0)
        start = _HEAD.size + side_len
        end = start + self.word.itemsize * nwords
        if end > len(data) or (not self.trailing and end != len(data)):
            raise CodecError("entropy block lengths do not match its size")
        side = zstd_decompress_bounded(data[_HEAD.size : start], g * (14 + MAX_SPAN), "entropy side info")
        words = np.frombuffer(data, self.word, nwords, start)
        tail = np.frombuffer(data, np.uint8, len(data) - end, end)
        return side, words, tail

    @staticmethod
    def _guarded(work: Callable[[], Any]) -> Any:
        try:
            return work()
        except CodecError:
            raise
        except Exception as exc:
            # Untrusted bytes meet third-party coders here (constriction asserts on data its
            # model cannot have produced, numpy and zstd raise their own types): whatever they
            # raise is a corrupt block, reported as kvzip's own error.
            raise CodecError(f"corrupt entropy-coded block ({type(exc).__name__}: {exc})") from None


# ---- the parametric model's clusters: encoder side ---------------------------------------
def fit_param(hist, lo, bounds, n):
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


def clustered_rows(cid, nc):
    """Row numbers sorted by cluster (constant rows last) and each cluster's bounds in them."""
    rows_by_c = np.argsort(cid, kind="stable")
    return rows_by_c, np.searchsorted(cid[rows_by_c], np.arange(nc + 1))


@dataclass
class Clusters:
    """Rows grouped by model: each row's ``center`` and cluster id ``cid`` (``_CONST_ROW``
    for a constant row), per cluster (all int64) ``frac, sidx, shape`` (the model) and the
    window ``lo, span`` relative to the rows' centres, and the coded rows in cluster order
    with each cluster's ``bounds`` in them."""

    center: np.ndarray
    cid: np.ndarray
    frac: np.ndarray
    sidx: np.ndarray
    shape: np.ndarray
    lo: np.ndarray
    span: np.ndarray
    rows_by_c: np.ndarray
    bounds: np.ndarray

    @property
    def nc(self) -> int:
        return self.frac.size

    def side_info(self) -> bytes:
        """The side info that ``param``, ``param2`` and ``rans`` share."""
        return b"".join([
            struct.pack("<I", self.nc),
            self.center.astype("<i4").tobytes(),
            self.cid.astype("<u2").tobytes(),
            self.frac.astype(np.uint8).tobytes(), self.sidx.astype(np.uint8).tobytes(),
            self.shape.astype(np.uint8).tobytes(),
            self.lo.astype("<i4").tobytes(), self.span.astype("<i4").tobytes(),
        ])

    def symbols(self, matrix: np.ndarray) -> list[np.ndarray]:
        """Each cluster's 0-based symbols: its rows concatenated, in row order."""
        out = []
        for c in range(self.nc):
            rows = self.rows_by_c[self.bounds[c] : self.bounds[c + 1]]
            out.append((matrix[rows] - self.center[rows][:, None] - self.lo[c]).ravel())
        return out


Windows = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def cluster_rows(rows: Rows, windows: Windows | None = None) -> Clusters:
    """Fit a model to each coded row and group the rows whose models agree.

    Rows are re-centred on floor(mu); rows whose (mu fraction, s, shape) agree are
    concatenated and coded with one model: a few hundred models per chunk instead of
    one per row.  ``windows`` may widen each cluster's ``[lo, hi]`` (``param2`` rounds
    them to a coarse grid)."""
    g, n = rows.matrix.shape
    lo, span, coded = rows.lo, rows.span, rows.coded
    mu4, sidx, shape = fit_param(rows.hist, lo[coded], rows.bounds, n)
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
    if windows is not None:
        c_lo, c_hi = windows(c_lo, c_hi)
    c_span = c_hi - c_lo + 1
    if nc and int(c_span.max()) > MAX_SPAN:
        raise CodecError(f"symbol range exceeds {MAX_SPAN}; step too fine")
    if int(c_span.sum()) > span_budget(g, n):
        raise CodecError(f"the block's symbol ranges add up to more than {span_budget(g, n)} values; step too fine")
    c_shape = ukeys % len(BETAS)
    c_sidx = (ukeys // len(BETAS)) % 256
    c_frac = ukeys // (len(BETAS) * 256)
    rows_by_c, bounds = clustered_rows(cid, nc)
    return Clusters(center, cid, c_frac, c_sidx, c_shape, c_lo, c_span, rows_by_c, bounds)


# ---- the parametric model's clusters: decoder side ---------------------------------------
def parse_cluster_side(raw, g, per_cluster):
    """The part of a clustered layout's side info that ``param``, ``param2`` and ``rans``
    share: ``(nc, center, cid, (frac, sidx, shape, lo, span), offset after them)``.  The
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


def span_budget(g: int, n: int) -> int:
    """The most window values the clusters of a ``g x n`` block may declare in all."""
    return g * n + SPAN_SLACK


def check_cluster_models(frac, shape, span, min_span, g, n):
    """Refuse cluster models outside what an encoder writes (a CodecError), among them
    windows that add up to more than :func:`span_budget` (before any of them is weighed)."""
    if span.size and (span.min() < min_span or span.max() > MAX_SPAN or frac.max() > 3
                      or shape.max() >= len(BETAS)):
        raise CodecError("entropy side info has an invalid model")
    if int(span.sum()) > span_budget(g, n):
        raise CodecError("entropy side info declares more model values than its block can use")


def group_rows(center, cid, nc, g, n):
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
    rows_by_c, bounds = clustered_rows(cid, nc)
    sizes = np.diff(bounds)
    if (sizes == 0).any():
        raise CodecError("entropy side info has an unused model")
    return out, rows_by_c, bounds, sizes


def place_clusters(out, buf, rows_by_c, center):
    """Add each coded row's centre to ``buf`` (the coded rows in cluster order) and copy
    the rows to their places in ``out``."""
    rows = rows_by_c[: buf.shape[0]]
    buf += center[rows][:, None]
    out[rows] = buf
    return out
