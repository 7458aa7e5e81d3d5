"""``hist``: each row's empirical histogram as its model.

Counts travel as 1/4-octave log codes, one byte per symbol value of the row's
alphabet: CacheGen's "one probability table per (layer, channel)", exact but costly in
side information for small chunks.  The ``cachegen`` reference codec writes it (``kvzip
bench`` stores that level, and the v1 golden ``golden_lossy_*.kvz`` files hold it).
Coded with constriction's range coder, one call per row; bitstream in docs/format.md.
"""

from __future__ import annotations

import constriction
import numpy as np

from kvzip.codecs.entropy._common import _R4, MAX_SPAN, EntropyLayout, Rows, _ragged
from kvzip.errors import CodecError

_Categorical = constriction.stream.model.Categorical
_RangeEncoder = constriction.stream.queue.RangeEncoder
_RangeDecoder = constriction.stream.queue.RangeDecoder

_MAX_CODE = 4 * 48  # the largest count code a decoder accepts


def _hist_weights(q: np.ndarray) -> np.ndarray:
    """1/4-octave log codes -> integer weights (0 stays 0)."""
    q = q.astype(np.int64)
    e = np.maximum(q - 1, 0)
    w = _R4[e & 3] << (e >> 2)
    return np.where(q > 0, w, 0)


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


class HistLayout(EntropyLayout):
    name = "hist"

    def _encode(self, rows: Rows):
        lo, span, hist = rows.lo, rows.span, rows.hist
        q = np.where(hist > 0, np.rint(4 * np.log2(np.maximum(hist, 1))).astype(np.int64) + 1, 0)
        side = b"".join([lo.astype("<i4").tobytes(), span.astype("<i4").tobytes(), q.astype(np.uint8).tobytes()])
        enc = _RangeEncoder()
        _code_rows(enc, rows.coded, span, rows.bounds[:-1], _hist_weights(q), rows.matrix.shape[1],
                   matrix=rows.matrix, lo=lo)
        return side, enc.get_compressed(), b""

    def _decode(self, side, words, tail, g, n):
        if len(side) < 8 * g:
            raise CodecError("entropy side info is truncated")
        lo = np.frombuffer(side, "<i4", g, 0).astype(np.int64)
        span = np.frombuffer(side, "<i4", g, 4 * g).astype(np.int64)
        if span.min() < 1 or span.max() > MAX_SPAN:
            raise CodecError("entropy side info has an invalid symbol span")
        coded = np.flatnonzero(span > 1)
        pos = 8 * g
        rid, kk, offs = _ragged(span, coded)
        if len(side) != pos + kk.size:
            raise CodecError("entropy side info has the wrong size")
        q = np.frombuffer(side, np.uint8, kk.size, pos)
        if kk.size and q.max() > _MAX_CODE:
            raise CodecError("entropy side info has an invalid count code")
        wflat = _hist_weights(q)
        out = np.empty((g, n), np.int32)
        out[:] = lo.astype(np.int32)[:, None]
        if coded.size:
            _code_rows(_RangeDecoder(words), coded, span, offs, wflat, n, out=out)
        return out
