"""Quantisers: float32 KV [2, L, H, T, D] -> integer symbol matrices + side info.

Symbol matrices put one probability-model group per row:

* :class:`TokenAbsmaxQuantizer` (CacheGen): per (K/V, layer, token) absmax across
  all heads and channels, ``2 * (bins // 2 - 1) + 1`` levels, bins chosen per layer.
  Rows are (K/V, layer, channel), channel = (head, dim), as in CacheGen/LMCache.
* :class:`UniformStepQuantizer` (kvzip): ``round(x / step)`` with one step per
  (K/V, layer) set relative to that layer's RMS in the chunk, so the error is
  bounded by ``step / 2`` everywhere; optional per-channel (keys) and per-token
  (values) step scaling; the first tokens of the sequence (attention sinks) get a
  finer step.  Rows are (K/V, layer, head, channel) over the chunk's tokens; sink
  tokens form their own rows per (K/V, layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvzip.codecs.base import ChunkContext
from kvzip.codecs.stages import Quantizer, SymbolBlocks
from kvzip.errors import CodecError

_MAX_ABS_SYMBOL = 1 << 20


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise CodecError("lossy codecs need finite KV values (found inf or nan)")


def _to_rows(x: np.ndarray) -> np.ndarray:
    """[2, L, H, T, D] -> [2*L*H*D, T] (rows: K/V, layer, head, channel)."""
    two, layers, heads, tokens, dim = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 2, 4, 3)).reshape(two * layers * heads * dim, tokens)


def _from_rows(rows: np.ndarray, shape) -> np.ndarray:
    two, layers, heads, tokens, dim = shape
    return rows.reshape(two, layers, heads, dim, tokens).transpose(0, 1, 2, 4, 3)


class TokenAbsmaxQuantizer(Quantizer):
    """CacheGen's quantiser: per-token absmax scale per layer, layer-wise bins."""

    def __init__(self, key_bins: list[int], value_bins: list[int]):
        self.bins = np.array([key_bins, value_bins], dtype=np.int64)  # [2, L]
        if (self.bins < 4).any():
            raise CodecError("cachegen bins must be >= 4")

    def _levels(self, ctx: ChunkContext) -> np.ndarray:
        layers = list(ctx.layers)
        if ctx.layer_ids is None and self.bins.shape[1] != ctx.num_layers or max(layers) >= self.bins.shape[1]:
            raise CodecError(f"cachegen bins are for {self.bins.shape[1]} layers, the chunk has layer {max(layers)}")
        return (self.bins[:, layers] // 2 - 1).astype(np.float32)  # C: symbols in [-C, C]

    def symbol_shapes(self, ctx):
        return [(2 * ctx.num_layers * ctx.kv_heads * ctx.head_dim, ctx.token_count)]

    def quantize(self, x, ctx):
        _check_finite(x)
        c = self._levels(ctx)[:, :, None, None, None]
        amax = np.abs(x).max(axis=(2, 4)).astype(np.float16)  # [2, L, T]
        a = amax.astype(np.float32)
        a = np.where(a > 0, a, 1.0)[:, :, None, :, None]
        sym = np.clip(np.rint(x / a * c), -c, c).astype(np.int32)
        return SymbolBlocks([_to_rows(sym)], amax.astype("<f2").tobytes())

    def dequantize(self, blocks, ctx):
        n = 2 * ctx.num_layers * ctx.token_count
        if len(blocks.side) != 2 * n:
            raise CodecError("cachegen scale block has the wrong size")
        amax = np.frombuffer(blocks.side, "<f2").astype(np.float32).reshape(2, ctx.num_layers, 1, ctx.token_count, 1)
        if not np.isfinite(amax).all():
            raise CodecError("cachegen scale block holds non-finite scales")
        c = self._levels(ctx)[:, :, None, None, None]
        sym = _from_rows(blocks.matrices[0], ctx.shape).astype(np.float32)
        return sym * (amax / c)


@dataclass
class RowFactors:
    """A chunk's symbols and steps in the rows' layout ([2, L, H, D, tokens]): ``main``
    (int32, the tokens past the sinks) times ``key_steps[0]`` / ``value_steps[0]``, and
    ``sinks`` (int32, or None) times ``key_steps[1]`` / ``value_steps[1]``; the steps
    broadcast.  ``shape``: (L, H, D, T, sink tokens)."""

    main: np.ndarray
    sinks: np.ndarray | None
    key_steps: tuple
    value_steps: tuple
    shape: tuple[int, int, int, int, int]


def _tokens(steps: np.ndarray, axis: int, part: slice) -> np.ndarray:
    """``steps`` restricted to some tokens along ``axis``, when it varies along it (a step
    that is the same for every token broadcasts as it is)."""
    if steps.shape[axis] == 1:
        return steps
    index = [slice(None)] * steps.ndim
    index[axis] = part
    return steps[tuple(index)]


def _q4(ratio: np.ndarray) -> np.ndarray:
    """Quarter-octave int8 code of a positive ratio."""
    r = np.maximum(ratio, 2.0**-31)
    return np.clip(np.rint(4 * np.log2(r)), -127, 127).astype(np.int8)


def check_importance_factors(factors, codec: str) -> list[float] | None:
    """A codec's ``importance_factors``: None, or 2 to 4 step multipliers in [1/16, 16],
    one of them 1 (the class of entries nobody scored)."""
    if factors is None:
        return None
    if (not isinstance(factors, (list, tuple)) or not 2 <= len(factors) <= 4
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and np.isfinite(f)
                       and 1 / 16 <= f <= 16 for f in factors) or 1.0 not in factors):
        raise CodecError(f"{codec} importance_factors must be 2 to 4 numbers in [1/16, 16], one of them 1")
    return [float(f) for f in factors]


class UniformStepQuantizer(Quantizer):
    """kvzip's quantiser: a bounded-error uniform step per (K/V, layer)."""

    def __init__(self, key_step, value_step, key_channel_exp=0.0, value_token_exp=0.0,
                 sink_tokens=4, sink_factor=16.0, early_layers=0, early_factor=1.0,
                 layer_scale: np.ndarray | None = None, importance_factors=None):
        self.rel = np.array([key_step, value_step], dtype=np.float32)
        # Importance classes (kvzip.importance): class c of a (layer, head, token) multiplies
        # its step by importance_factors[c]; the classes travel in the side info.
        self.factors = None if importance_factors is None else np.asarray(importance_factors, np.float32)
        # Absolute steps: ``layer_scale`` [2, L] (from a calibration profile) times the
        # relative step, instead of the chunk's RMS times it.  The chunk RMS is still
        # stored and only normalises the per-token value codes.
        self.layer_scale = None if layer_scale is None else np.asarray(layer_scale, np.float32)
        self.key_channel_exp = float(key_channel_exp)
        self.value_token_exp = float(value_token_exp)
        self.sink_tokens = int(sink_tokens)
        self.sink_factor = float(sink_factor)
        self.early_layers = int(early_layers)
        self.early_factor = float(early_factor)

    def _sinks(self, ctx) -> int:
        return ctx.count_below(self.sink_tokens)

    def symbol_shapes(self, ctx):
        ns = self._sinks(ctx)
        shapes = [(2 * ctx.num_layers * ctx.kv_heads * ctx.head_dim, ctx.token_count - ns)]
        if ns:
            shapes.append((2 * ctx.num_layers, ctx.kv_heads * ns * ctx.head_dim))
        return shapes

    # side info: ref [2, L] f32 | key channel codes [L, H, D] i8 | value token codes [L, T] i8
    # | importance classes (with factors): u32 n, then n bytes of zstd of the [L, H, T] classes
    #   packed 2 bits each (4 to a byte, first in the low bits)
    def _side_sizes(self, ctx):
        L, H, T, D = ctx.num_layers, ctx.kv_heads, ctx.token_count, ctx.head_dim
        return 8 * L, (L * H * D if self.key_channel_exp else 0), (L * T if self.value_token_exp else 0)

    def default_class(self) -> int:
        """The class of an entry nobody scored: the one whose factor is 1."""
        return int(np.flatnonzero(self.factors == 1.0)[0])

    def _classes(self, ctx) -> np.ndarray:
        """The chunk's importance classes [L, H, T] (uint8) for encoding."""
        shape = (ctx.num_layers, ctx.kv_heads, ctx.token_count)
        cls = ctx.importance
        if cls is None:
            return np.full(shape, self.default_class(), np.uint8)
        cls = np.asarray(cls, np.uint8)
        if cls.shape != shape or (cls.size and int(cls.max()) >= self.factors.size):
            raise CodecError(f"importance classes of shape {cls.shape} for a chunk of {shape}")
        return cls

    def _pack_classes(self, cls: np.ndarray) -> bytes:
        import zstandard

        flat = cls.reshape(-1)
        pad = (-flat.size) % 4
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, 4)
        packed = (flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6).astype(np.uint8)
        frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(packed.tobytes())
        return np.uint32(len(frame)).astype("<u4").tobytes() + frame

    def _unpack_classes(self, data: bytes, ctx) -> np.ndarray:
        from kvzip.compression import zstd_decompress_bounded

        n = ctx.num_layers * ctx.kv_heads * ctx.token_count
        if len(data) < 4 or int(np.frombuffer(data[:4], "<u4")[0]) != len(data) - 4:
            raise CodecError("kvzip-lossy importance classes have the wrong size")
        raw = zstd_decompress_bounded(data[4:], (n + 3) // 4, "importance classes")
        if len(raw) != (n + 3) // 4:
            raise CodecError("kvzip-lossy importance classes have the wrong size")
        packed = np.frombuffer(raw, np.uint8)
        cls = np.stack([packed & 3, packed >> 2 & 3, packed >> 4 & 3, packed >> 6 & 3], axis=1).reshape(-1)[:n]
        if cls.size and int(cls.max()) >= self.factors.size:
            raise CodecError("kvzip-lossy importance classes name a class the codec does not have")
        return cls.reshape(ctx.num_layers, ctx.kv_heads, ctx.token_count)

    def class_count(self) -> int:
        return 0 if self.factors is None else int(self.factors.size)

    def element_classes(self, side: bytes, ctx) -> list[np.ndarray] | None:
        if self.factors is None:
            return None
        L, H, T, D = ctx.num_layers, ctx.kv_heads, ctx.token_count, ctx.head_dim
        cls = self._unpack_classes(side[sum(self._side_sizes(ctx)):], ctx)
        ns = self._sinks(ctx)
        out = [np.broadcast_to(cls[None, :, :, None, ns:], (2, L, H, D, T - ns)).reshape(2 * L * H * D, T - ns)]
        if ns:
            out.append(np.broadcast_to(cls[None, :, :, :ns, None], (2, L, H, ns, D)).reshape(2 * L, H * ns * D))
        return out

    def _steps(self, ref, kcode, vcode, ctx, cls=None) -> np.ndarray:
        """Step per element, broadcastable to [2, L, H, T, D] (float32)."""
        L, H, T, D = ctx.num_layers, ctx.kv_heads, ctx.token_count, ctx.head_dim
        ids = np.asarray(ctx.layers)
        layer_mult = np.where(ids < self.early_layers, np.float32(1.0 / self.early_factor),
                              np.float32(1.0)).astype(np.float32)
        if self.layer_scale is None:
            scale = ref
        else:
            if self.layer_scale.ndim != 2 or self.layer_scale.shape[0] != 2 or (
                    self.layer_scale.shape[1] != L if ctx.layer_ids is None
                    else int(ids.max()) >= self.layer_scale.shape[1]):
                raise CodecError(f"step scales for {self.layer_scale.shape[-1]} layers, chunk has {L}")
            scale = self.layer_scale if ctx.layer_ids is None else self.layer_scale[:, ids]
        base = (scale * self.rel[:, None] * layer_mult[None, :]).astype(np.float32)  # [2, L]
        ks = np.broadcast_to(base[0][:, None, None, None], (L, 1, 1, 1)).astype(np.float32)
        vs = np.broadcast_to(base[1][:, None, None, None], (L, 1, 1, 1)).astype(np.float32)
        if kcode is not None:
            ks = ks * np.exp2(kcode.astype(np.float32) * (0.25 * self.key_channel_exp)).reshape(L, H, 1, D)
        if vcode is not None:
            vs = vs * np.exp2(vcode.astype(np.float32) * (0.25 * self.value_token_exp)).reshape(L, 1, T, 1)
        if cls is not None:
            f = self.factors[cls][..., None]  # [L, H, T, 1]
            ks, vs = ks * f, vs * f
        return ks, vs

    def quantize(self, x, ctx):
        _check_finite(x)
        ns = self._sinks(ctx)
        body = x[:, :, :, ns:, :] if ns < ctx.token_count else x
        ref = np.sqrt(np.mean(np.square(body, dtype=np.float64), axis=(2, 3, 4))).astype(np.float32)
        ref = np.where(ref > 0, ref, np.float32(1.0)).astype(np.float32)
        kcode = vcode = None
        if self.key_channel_exp:
            kb = body[0]
            std = np.sqrt(np.maximum(kb.var(axis=2, dtype=np.float64), 0))  # [L, H, D]
            kcode = _q4(std / ref[0][:, None, None])
        if self.value_token_exp:
            rms_t = np.sqrt(np.mean(np.square(x[1], dtype=np.float64), axis=(1, 3)))  # [L, T]
            vcode = _q4(rms_t / ref[1][:, None])
        cls = None if self.factors is None else self._classes(ctx)
        ks, vs = self._steps(ref, kcode, vcode, ctx, cls)
        sym = np.empty(x.shape, np.int64)
        sym[0] = np.rint(x[0] / ks)
        sym[1] = np.rint(x[1] / vs)
        if ns:
            sym[0, :, :, :ns] = np.rint(x[0, :, :, :ns] / (_tokens(ks, 2, slice(0, ns)) * np.float32(1 / self.sink_factor)))
            vsink = _tokens(vs, 2, slice(0, ns))
            sym[1, :, :, :ns] = np.rint(x[1, :, :, :ns] / (vsink * np.float32(1 / self.sink_factor)))
        if np.abs(sym).max(initial=0) > _MAX_ABS_SYMBOL:
            raise CodecError("values too large for the configured step")
        mats = [_to_rows(sym[:, :, :, ns:, :])]
        if ns:
            mats.append(np.ascontiguousarray(sym[:, :, :, :ns, :]).reshape(2 * ctx.num_layers, -1))
        side = ref.astype("<f4").tobytes()
        if kcode is not None:
            side += kcode.tobytes()
        if vcode is not None:
            side += vcode.tobytes()
        if cls is not None:
            side += self._pack_classes(cls)
        return SymbolBlocks([m.astype(np.int32) for m in mats], side)

    def dequantize(self, blocks, ctx):
        return self.dequantize_rows(blocks, ctx).transpose(0, 1, 2, 4, 3)

    def dequantize_rows(self, blocks, ctx) -> np.ndarray:
        """The values in the symbol matrices' own layout, [2, L, H, D, T] float32
        (channels by tokens), as :meth:`dequantize` returns them transposed; a decoder
        that multiplies by a basis from the left needs no transposition before it."""
        rows = self.row_factors(blocks, ctx)
        L, H, D, T, ns = rows.shape
        out = np.empty((2, L, H, D, T), np.float32)
        # int32 symbols times float32 steps computed in float32: symbols are below
        # 2**24, so this is the correctly rounded product, as a float64 product
        # rounded to float32 would be, without the float64 temporaries.
        np.multiply(rows.main[0], rows.key_steps[0], out=out[0, ..., ns:], dtype=np.float32)
        np.multiply(rows.main[1], rows.value_steps[0], out=out[1, ..., ns:], dtype=np.float32)
        if ns:
            sk = rows.sinks.astype(np.float32)
            out[0, ..., :ns] = sk[0] * rows.key_steps[1]
            out[1, ..., :ns] = sk[1] * rows.value_steps[1]
        return out

    def row_factors(self, blocks, ctx) -> RowFactors:
        """What :meth:`dequantize_rows` multiplies, checked: the symbols and their steps
        in the rows' layout (a decoder elsewhere, e.g. on an accelerator, does the products)."""
        L, H, T, D = ctx.num_layers, ctx.kv_heads, ctx.token_count, ctx.head_dim
        nref, nk, nv = self._side_sizes(ctx)
        fixed = nref + nk + nv
        if len(blocks.side) != fixed if self.factors is None else len(blocks.side) < fixed + 4:
            raise CodecError("kvzip-lossy side info has the wrong size")
        cls = None if self.factors is None else self._unpack_classes(blocks.side[fixed:], ctx)
        ref = np.frombuffer(blocks.side, "<f4", 2 * L).reshape(2, L).astype(np.float32)
        if not np.isfinite(ref).all() or (ref <= 0).any():
            raise CodecError("kvzip-lossy side info holds invalid scales")
        kcode = np.frombuffer(blocks.side, np.int8, nk, nref) if nk else None
        vcode = np.frombuffer(blocks.side, np.int8, nv, nref + nk) if nv else None
        ks, vs = self._steps(ref, kcode, vcode, ctx, cls)
        ks, vs = ks.swapaxes(-1, -2), vs.swapaxes(-1, -2)  # to [L, H|1, D|1, T|1]
        ns = self._sinks(ctx)
        main = blocks.matrices[0].reshape(2, L, H, D, T - ns)
        sinks = None
        sink = np.float32(1 / self.sink_factor)
        key_steps = (_tokens(ks, 3, slice(ns, None)), _tokens(ks, 3, slice(0, ns)) * sink if ns else None)
        value_steps = (_tokens(vs, 3, slice(ns, None)), _tokens(vs, 3, slice(0, ns)) * sink if ns else None)
        if ns:
            sinks = blocks.matrices[1].reshape(2, L, H, ns, D).swapaxes(-1, -2)
        return RowFactors(main, sinks, key_steps, value_steps, (L, H, D, T, ns))
