"""``kvzip-profile``: kvzip's calibrated codec, the default behind the lossy levels.

Stages (each one measured against the alternatives in ``kvzip calibrate``'s
docs and ``docs/benchmarks.md``):

1. keys un-rotated to pre-RoPE (:class:`~kvzip.codecs.transforms.UnRoPE`);
2. :class:`ProfileBasis`: per layer (across its kv heads, the default) or per kv
   head, subtract the calibrated mean and map into the profile's basis: an error
   weighting (query channel-pair energy for keys, the output projection's Gram
   matrix for values) followed by the PCA of the weighted data, so a uniform
   error in the new basis is the error that costs the model least, and most of
   the energy sits in few components;
3. a uniform quantiser whose step per (K/V, layer) is the codec's ``step`` times
   the profile's ``step_scale``, allocated from each layer's measured effect on
   next-token KL; values also scale per token with their RMS (``value_token_exp``)
   and the first ``sink_tokens`` tokens get a ``sink_factor`` times finer step;
4. entropy coding (kvzip's rANS coder, ``entropy="rans"``) with small parametric
   models per cluster of rows.

The codec config names its profile by SHA-256; see :mod:`kvzip.codecs.profile`.
"""

from __future__ import annotations

import numpy as np

from kvzip.codecs.base import ChunkContext, one_blas_thread
from kvzip.codecs.entropy import entropy_layout
from kvzip.codecs.profile import Profile
from kvzip.codecs.quantize import UniformStepQuantizer, check_importance_factors
from kvzip.codecs.registry import register_codec
from kvzip.codecs.stages import ArrayTransform, StagedCodec, StagePipeline
from kvzip.codecs.transforms import UnRoPE, rope_cos_sin, rotate
from kvzip.errors import CodecError


def matmul_one_thread(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on one BLAS thread.

    The products are small (a chunk's tokens x head_dim x head_dim), and decoding
    runs one decoder per core: BLAS threads on top of that oversubscribe the
    cores, and OpenBLAS's spinning threads then halve the whole decode (measured:
    two decoders ran at 19-23 M elements/s each with two BLAS threads, 34-36 with one).
    """
    with one_blas_thread():
        return np.matmul(a, b)


class ProfileBasis(ArrayTransform):
    """Per layer, the [heads * dim] channel vector of every token is split into the
    profile's groups (one per kv head, or one for the whole layer); each group maps
    ``y = fwd @ (x - mean)`` on encode and ``x = inv @ y + mean`` on decode.  The
    result keeps the [2, L, H, T, D] layout (components fill the "heads" in order),
    so quantiser and entropy coder are the same for every basis shape.  The codec
    checks the chunk's geometry against the profile before any stage runs."""

    def __init__(self, profile: Profile):
        t = profile.tensors
        self.profile = profile
        layers, heads, dim = t["key_mean"].shape
        self.groups = t["key_fwd"].shape[1]
        self.width = heads * dim // self.groups
        g, w = self.groups, self.width
        mean = np.stack([t["key_mean"], t["value_mean"]]).reshape(2, layers, g, 1, w)
        self.mean = mean.astype(np.float32)
        # Row-vector form: y = (x - mean) @ fwd^T, x = y @ inv^T + mean.
        self.fwd_t = np.ascontiguousarray(np.stack([t["key_fwd"], t["value_fwd"]]).swapaxes(-1, -2))
        self.inv_t = np.ascontiguousarray(np.stack([t["key_inv"], t["value_inv"]]).swapaxes(-1, -2))
        # For decoding from the quantiser's channels-by-tokens rows: each head's columns
        # of inv^T, [2, L, G, H/G, W, D], and the mean per head, [2, L, H, 1, D].
        per = heads // g
        self.inv_heads = np.ascontiguousarray(
            self.inv_t.reshape(2, layers, g, w, per, dim).transpose(0, 1, 2, 4, 3, 5), dtype=np.float32)
        self.mean_heads = np.ascontiguousarray(mean.reshape(2, layers, heads, 1, dim), dtype=np.float32)

        self.heads = heads
        self._parts: dict[tuple, ProfileBasis] = {}

    def part(self, ctx: ChunkContext) -> ProfileBasis:
        """The basis restricted to the chunk's layers and heads (itself for a whole chunk).
        A per-layer basis (one group across the heads) needs every head of a layer."""
        if ctx.layer_ids is None and ctx.head_ids is None:
            return self
        key = (ctx.layers, ctx.heads)
        if key not in self._parts:
            layers, heads = list(ctx.layers), list(ctx.heads)
            if max(layers) >= self.mean.shape[1] or max(heads) >= self.heads:
                raise CodecError("the chunk names a layer or head the profile does not have")
            if len(heads) != self.heads and self.groups != self.heads:
                raise CodecError("this profile's basis spans a layer's heads; it cannot code some heads alone")
            sub = object.__new__(ProfileBasis)
            g = self.groups if len(heads) == self.heads else len(heads)
            pick = slice(None) if len(heads) == self.heads else heads
            sub.profile, sub.groups, sub.width, sub.heads = self.profile, g, self.width, len(heads)
            sub.mean = np.ascontiguousarray(self.mean[:, layers][:, :, pick])
            sub.fwd_t = np.ascontiguousarray(self.fwd_t[:, layers][:, :, pick])
            sub.inv_t = np.ascontiguousarray(self.inv_t[:, layers][:, :, pick])
            sub.inv_heads = np.ascontiguousarray(self.inv_heads[:, layers][:, :, pick])
            sub.mean_heads = np.ascontiguousarray(self.mean_heads[:, layers][:, :, pick])
            sub._parts = {}
            self._parts[key] = sub
        return self._parts[key]

    def _grouped(self, x: np.ndarray) -> np.ndarray:
        """[2, L, H, T, D] -> [2, L, G, T, W] (a view when G = H)."""
        two, layers, heads, tokens, dim = x.shape
        if self.groups == heads:
            return x
        return x.transpose(0, 1, 3, 2, 4).reshape(two, layers, tokens, self.groups, self.width).transpose(0, 1, 3, 2, 4)

    def _ungrouped(self, y: np.ndarray, shape) -> np.ndarray:
        two, layers, heads, tokens, dim = shape
        if self.groups == heads:
            return y
        return np.ascontiguousarray(
            y.transpose(0, 1, 3, 2, 4).reshape(two, layers, tokens, heads, dim).transpose(0, 1, 3, 2, 4))

    def forward(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        b = self.part(ctx)
        return b._ungrouped(matmul_one_thread(b._grouped(x) - b.mean, b.fwd_t), x.shape)

    def inverse_rows(self, rows: np.ndarray) -> np.ndarray:
        """Decode from the quantiser's rows, [2, L, H, D, T] (channels by tokens,
        contiguous), to a new contiguous [2, L, H, T, D] array.  The rows' transpose is
        handed to BLAS as it is (a transposed operand costs nothing there), and each
        head's output columns are computed as their own product, so the result comes
        out in the cache's layout with no copy before or after."""
        two, layers, heads, dim, tokens = rows.shape
        y = rows.reshape(two, layers, self.groups, 1, self.width, tokens).swapaxes(-1, -2)
        out = matmul_one_thread(y, self.inv_heads).reshape(two, layers, heads, tokens, dim)
        out += self.mean_heads
        return out

    def inverse(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        b = self.part(ctx)
        out = matmul_one_thread(b._grouped(x), b.inv_t)
        out += b.mean
        return b._ungrouped(out, x.shape)


@register_codec
class KvzipProfileCodec(StagedCodec):
    codec_id = "kvzip-profile"
    needs_profile = True

    def __init__(self, profile: Profile, step: float = 0.3, value_token_exp: float = 0.5,
                 sink_tokens: int = 4, sink_factor: float = 16.0, entropy: str = "param",
                 importance_factors: list[float] | None = None):
        for name, v in (("step", step), ("value_token_exp", value_token_exp), ("sink_factor", sink_factor)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise CodecError(f"kvzip-profile {name} must be a finite number, got {v!r}")
        if not 0 < step <= 64:
            raise CodecError("kvzip-profile step must lie in (0, 64]")
        if not 1 <= sink_factor <= 4096 or not -2 <= value_token_exp <= 2:
            raise CodecError("kvzip-profile sink_factor must lie in [1, 4096], value_token_exp in [-2, 2]")
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or not 0 <= sink_tokens <= 1 << 20:
            raise CodecError("kvzip-profile sink_tokens must be a non-negative integer")
        if not isinstance(profile, Profile):
            raise CodecError("kvzip-profile is built with its calibration profile (kvzip.levels finds it)")
        self._p = dict(profile=profile.digest, step=step, value_token_exp=value_token_exp,
                       sink_tokens=sink_tokens, sink_factor=sink_factor, entropy=entropy)
        factors = check_importance_factors(importance_factors, "kvzip-profile")
        if factors is not None:  # absent from configs that do not use it: their bytes are unchanged
            self._p["importance_factors"] = factors
        self.profile = profile
        self.basis = ProfileBasis(self.profile)
        self.pipeline = StagePipeline([
            UnRoPE(),
            self.basis,
            UniformStepQuantizer(step, step, 0.0, value_token_exp, sink_tokens, sink_factor,
                                 layer_scale=self.profile.tensors["step_scale"], importance_factors=factors),
            entropy_layout(entropy),
        ])

    def codes_heads_apart(self) -> bool:
        return self.basis.groups == self.basis.heads  # a per-layer basis maps the heads jointly

    def check_chunk(self, ctx: ChunkContext) -> None:
        if ctx.layer_ids is None and ctx.head_ids is None:
            self.profile.check_geometry(ctx.num_layers, ctx.kv_heads, ctx.head_dim)
        else:  # a block of a 2.x chunk: the file's geometry was checked when the level was built
            layers, heads, dim = self.profile.geometry
            if ctx.head_dim != dim or max(ctx.layers) >= layers or max(ctx.heads) >= heads:
                self.profile.check_geometry(max(ctx.layers) + 1, max(ctx.heads) + 1, ctx.head_dim)

    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        out = np.empty(ctx.shape, np.float32)
        self.decode_into(payload, ctx, out)
        return out

    def decode_into(self, payload: bytes, ctx: ChunkContext, out: np.ndarray) -> None:
        """The pipeline's stages in reverse, in the layout that costs least: the
        quantiser's rows (channels by tokens) go through the basis without a copy
        (:meth:`ProfileBasis.inverse_rows`), then the keys are re-rotated straight
        into ``out`` and the values copied there."""
        self.check_chunk(ctx)
        if out.shape != ctx.shape:
            raise CodecError(f"output has shape {out.shape}, the chunk {ctx.shape}")
        rows = self.pipeline.quantizer.dequantize_rows(self.pipeline.decode_blocks(payload, ctx), ctx)
        x = self.basis.part(ctx).inverse_rows(rows)
        if ctx.rope_inv_freq is None:
            out[0] = x[0]
        else:
            cos, sin = rope_cos_sin(ctx)
            rotate(x[0], cos, sin, +1.0, out=out[0])
        out[1] = x[1]
