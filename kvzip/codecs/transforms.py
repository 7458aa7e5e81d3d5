"""Array -> array transforms applied before quantisation.

:class:`UnRoPE` turns keys back into their pre-RoPE values (KVQuant's pre-RoPE
key quantisation): rotated keys mix each channel pair (i, i + D/2) with a
position-dependent angle, which smears per-channel structure (a few large,
slowly varying channels) across the pair and costs bits.  Uses the HF Llama
``rotate_half`` convention: pairs (i, i + D/2), angle = position * inv_freq[i].
"""

from __future__ import annotations

import numpy as np

from kvzip.codecs.base import ChunkContext
from kvzip.codecs.stages import ArrayTransform
from kvzip.errors import CodecError


def rope_cos_sin(ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each [tokens, head_dim // 2] float32, for the chunk's positions."""
    if ctx.rope_inv_freq is None:
        raise CodecError("this codec un-rotates keys and needs ctx.rope_inv_freq")
    inv = np.asarray(ctx.rope_inv_freq, dtype=np.float64)
    if inv.shape != (ctx.head_dim // 2,) or ctx.head_dim % 2:
        raise CodecError(f"rope_inv_freq has {inv.size} values; head_dim {ctx.head_dim} needs {ctx.head_dim // 2}")
    pos = ctx.position_array().astype(np.float64)
    ang = pos[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate(keys: np.ndarray, cos: np.ndarray, sin: np.ndarray, sign: float,
           out: np.ndarray | None = None) -> np.ndarray:
    """Apply (sign=+1) or undo (sign=-1) RoPE on keys [..., tokens, head_dim].

    ``out`` may be ``keys`` itself (rotation in place).  Works through the leading
    axes a slab at a time so the temporaries stay in cache; the arithmetic (and so
    every bit of the result) is the same as the whole-array formula
    ``a * cos - b * s, b * cos + a * s``.
    """
    if out is None:
        out = np.empty(keys.shape, keys.dtype)
    h = keys.shape[-1] // 2
    s = sin if sign > 0 else -sin
    flat_in = keys.reshape(-1, *keys.shape[-2:])
    flat_out = out.reshape(-1, *out.shape[-2:])
    if out.size and not np.may_share_memory(flat_out, out):  # reshape had to copy
        raise AssertionError("rotate needs an output whose leading axes merge without a copy")
    per = max(1, (1 << 16) // max(1, keys.shape[-2] * h))  # ~256 KiB of float32 per temporary
    for i in range(0, flat_in.shape[0], per):
        a, b = flat_in[i : i + per, :, :h], flat_in[i : i + per, :, h:]
        t1 = a * cos
        t1 -= b * s
        t2 = b * cos
        t2 += a * s
        flat_out[i : i + per, :, :h] = t1
        flat_out[i : i + per, :, h:] = t2
    return out


class UnRoPE(ArrayTransform):
    """Keys: post-RoPE -> pre-RoPE on encode, re-rotated on decode. Values untouched.

    A model without one plain RoPE for every layer (Gemma 3's local/global bases,
    YaRN's scaling) has no ``rope_inv_freq`` in its file; then keys are coded as
    stored.  Encoder and decoder read the same header, so both sides agree.
    """

    def forward(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        if ctx.rope_inv_freq is None:
            return x
        cos, sin = rope_cos_sin(ctx)
        x = x.copy()
        x[0] = rotate(x[0], cos, sin, -1.0)
        return x

    def inverse(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        if ctx.rope_inv_freq is None:
            return x
        cos, sin = rope_cos_sin(ctx)
        rotate(x[0], cos, sin, +1.0, out=x[0])
        return x
