"""zstd with a bound: what the container and the codecs both decompress through."""

from __future__ import annotations

import zstandard

from kvzip.errors import CodecError, KvzipError


def zstd_decompress_bounded(
    payload: bytes, limit: int, what: str, error: type[KvzipError] = CodecError
) -> bytes:
    """zstd-decompress a frame that declares a content size of at most ``limit`` bytes.

    ``ZstdDecompressor.decompress`` allocates whatever size the frame header
    declares (``max_output_size`` does not stop it), so a tiny hostile payload
    could ask for gigabytes; the declared size is checked first.  kvzip's
    writers always declare it.
    """
    try:
        declared = zstandard.frame_content_size(payload)
        if declared < 0:
            raise error(f"{what}: zstd frame does not declare its size")
        if declared > limit:
            raise error(f"{what}: zstd frame declares {declared} bytes, the cap is {limit}")
        return zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise error(f"{what}: corrupt zstd data ({exc})") from None
