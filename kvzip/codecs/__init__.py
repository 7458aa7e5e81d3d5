"""KV codecs: a registry of staged encoders, each an id plus a JSON config.

Importing this package registers every built-in codec and quality level.
This is the only package that imports ``constriction``.
"""

from kvzip.codecs import cachegen as _cachegen  # noqa: F401  (registers)
from kvzip.codecs import kvzip_lossy as _kvzip_lossy  # noqa: F401  (registers)
from kvzip.codecs import kvzip_profile as _kvzip_profile  # noqa: F401  (registers)
from kvzip.codecs import lossless as _lossless  # noqa: F401  (registers)
from kvzip.codecs.base import STORAGE_DTYPES, ChunkContext, Codec, one_blas_thread, to_float32
from kvzip.codecs.registry import (
    CALIBRATED_LEVELS,
    DEFAULT_LEVEL,
    LEVELS,
    codec_for_level,
    codec_from_config,
    codec_ids,
    level_config,
    register_codec,
    register_level,
)

register_level("lossless", {"id": "bytegroup-zstd", "zstd_level": 3})
# Lossy levels (measured in benchmarks/codec_quality.py; numbers in the codec docs).
_KVZIP_LOSSY_BASE = {
    "id": "kvzip-lossy", "prerope": True, "key_channel_exp": 0.0, "value_token_exp": 0.5,
    "sink_tokens": 4, "sink_factor": 16.0, "early_layers": 0, "early_factor": 1.0, "entropy": "rans",
}
# With a calibration profile for the model (kvzip calibrate), the levels use the
# calibrated codec; ``step`` is relative to the profile's per-layer allocation.
_PROFILE_BASE = {
    "id": "kvzip-profile", "value_token_exp": 0.5, "sink_tokens": 4, "sink_factor": 16.0, "entropy": "rans",
}
register_level("high", {**_KVZIP_LOSSY_BASE, "key_step": 0.12, "value_step": 0.2},
               calibrated={**_PROFILE_BASE, "step": 0.22})
register_level("balanced", {**_KVZIP_LOSSY_BASE, "key_step": 0.27, "value_step": 0.5},
               calibrated={**_PROFILE_BASE, "step": 0.45})
register_level("small", {**_KVZIP_LOSSY_BASE, "key_step": 0.55, "value_step": 1.0},
               calibrated={**_PROFILE_BASE, "step": 1.2})

__all__ = [
    "DEFAULT_LEVEL",
    "CALIBRATED_LEVELS",
    "LEVELS",
    "STORAGE_DTYPES",
    "ChunkContext",
    "Codec",
    "codec_for_level",
    "level_config",
    "one_blas_thread",
    "codec_from_config",
    "codec_ids",
    "register_codec",
    "register_level",
    "to_float32",
]
