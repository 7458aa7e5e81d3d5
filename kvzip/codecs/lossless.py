"""``bytegroup-zstd``: exact reconstruction by byte-plane split + zstd.

Floating-point KV values share their sign/exponent bytes far more than their low
mantissa bytes.  Splitting each element's bytes into planes (all most-significant
bytes, then the next...) puts the compressible bytes together, so zstd finds
them; the low planes are near-random and cost close to their raw size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zstandard

from kvzip.codecs.base import STORAGE_DTYPES, ChunkContext, Codec
from kvzip.codecs.registry import register_codec
from kvzip.compression import zstd_decompress_bounded
from kvzip.errors import CodecError


@register_codec
class ByteGroupZstd(Codec):
    codec_id = "bytegroup-zstd"
    lossless = True

    def __init__(self, zstd_level: int = 3):
        if not isinstance(zstd_level, int) or not -7 <= zstd_level <= 22:
            raise CodecError(f"zstd_level must be an integer in [-7, 22], got {zstd_level!r}")
        self.zstd_level = zstd_level

    def params(self) -> dict[str, Any]:
        return {"zstd_level": self.zstd_level}

    def encode(self, kv: np.ndarray, ctx: ChunkContext) -> bytes:
        dtype = STORAGE_DTYPES[ctx.dtype]
        if kv.shape != ctx.shape or kv.dtype != dtype:
            raise CodecError(f"expected {ctx.shape} {dtype}, got {kv.shape} {kv.dtype}")
        # [n, itemsize] little-endian bytes -> planes, most significant first.
        raw = np.ascontiguousarray(kv).view(np.uint8).reshape(-1, dtype.itemsize)
        planes = np.ascontiguousarray(raw[:, ::-1].T)
        return zstandard.ZstdCompressor(level=self.zstd_level).compress(planes.tobytes())

    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        dtype = STORAGE_DTYPES[ctx.dtype]
        expected = ctx.numel * dtype.itemsize
        data = zstd_decompress_bounded(payload, expected, "bytegroup-zstd payload")
        if len(data) != expected:
            raise CodecError(
                f"bytegroup-zstd payload holds {len(data)} bytes, expected {expected}"
            )
        planes = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, -1)
        raw = np.ascontiguousarray(planes[::-1].T)
        return raw.view(dtype).reshape(ctx.shape)
