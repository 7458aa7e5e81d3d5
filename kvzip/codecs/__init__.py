"""KV codecs: a registry of staged encoders, each an id plus a JSON config.

Importing this package registers every built-in codec (the named quality levels
that use them are :mod:`kvzip.levels.table`).  This is the only package that
imports ``constriction``.
"""

from kvzip.codecs import cachegen as _cachegen  # noqa: F401  (registers)
from kvzip.codecs import kvzip_lossy as _kvzip_lossy  # noqa: F401  (registers)
from kvzip.codecs import kvzip_profile as _kvzip_profile  # noqa: F401  (registers)
from kvzip.codecs import lossless as _lossless  # noqa: F401  (registers)
from kvzip.codecs.base import STORAGE_DTYPES, ChunkContext, Codec, one_blas_thread, to_float32
from kvzip.codecs.registry import codec_from_config, codec_ids, register_codec

__all__ = [
    "STORAGE_DTYPES",
    "ChunkContext",
    "Codec",
    "one_blas_thread",
    "codec_from_config",
    "codec_ids",
    "register_codec",
    "to_float32",
]
