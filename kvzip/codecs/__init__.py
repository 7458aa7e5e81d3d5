"""KV codecs: a registry of staged encoders, each an id plus a JSON config.

Importing this package registers every built-in codec and quality level.
This is the only package that imports ``constriction``.
"""

from kvzip.codecs import lossless as _lossless  # noqa: F401  (registers)
from kvzip.codecs.base import STORAGE_DTYPES, ChunkContext, Codec, to_float32
from kvzip.codecs.registry import (
    DEFAULT_LEVEL,
    LEVELS,
    codec_for_level,
    codec_from_config,
    codec_ids,
    register_codec,
    register_level,
)

register_level("lossless", {"id": "bytegroup-zstd", "zstd_level": 3})

__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "STORAGE_DTYPES",
    "ChunkContext",
    "Codec",
    "codec_for_level",
    "codec_from_config",
    "codec_ids",
    "register_codec",
    "register_level",
    "to_float32",
]
