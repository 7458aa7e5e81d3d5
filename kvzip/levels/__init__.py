"""The levels layer: from a level name to a cache array and back.

It owns what lies between the container's bytes (:mod:`kvzip.formats`) and the
codecs' arrays (:mod:`kvzip.codecs`):

* the named quality levels, their order and the default (:mod:`.table`);
* calibration profiles: where they are stored and found (:mod:`.profiles`),
  how they are made (:mod:`.calibrate`), and the one :func:`resolve` that turns
  level names into codecs for a model (:mod:`.resolve`);
* the chunk executor, threads of this process (:mod:`.executor`);
* :class:`LevelCodecs`, payloads <-> arrays chunk by chunk (:mod:`.chunks`), and
  the file-level paths: :func:`write_kvz`, :func:`open_cache` /
  :class:`CacheFile`, :func:`load_kv` (:mod:`.files`).

``kvzip.api``, ``kvzip.stream``, ``kvzip.store`` and ``kvzip.bench`` go through here.
"""

from kvzip.levels.chunks import LevelCodecs, chunk_ranges, encode_chunks
from kvzip.levels.executor import default_threads, on_threads, run_on_threads, threads_for
from kvzip.levels.files import (
    DEFAULT_CHUNK_TOKENS,
    AttachedKV,
    CacheFile,
    CacheStream,
    EncodeSummary,
    LoadedKV,
    attach_kv,
    chunk_span,
    kv_to_storage,
    load_kv,
    open_cache,
    storage_to_kv,
    stream_prefill,
    write_kvz,
)
from kvzip.levels.profiles import (
    find_profile,
    is_digest,
    list_profiles,
    profile_dirs,
    read_profile_file,
    register_profile_file,
    registered_profile_files,
    write_profile,
)
from kvzip.levels.progress import Progress, no_progress
from kvzip.levels.resolve import (
    IF_NO_PROFILE,
    UNCALIBRATED_IMPORTANCE,
    Resolved,
    check_if_missing,
    level_importance,
    model_profile,
    resolve,
)
from kvzip.levels.table import (
    CALIBRATED_LEVELS,
    DEFAULT_LEVEL,
    LEVELS,
    check_level,
    check_levels,
    codec_for_level,
    is_calibrated,
    level_config,
    register_level,
)

__all__ = [
    "CALIBRATED_LEVELS",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_LEVEL",
    "IF_NO_PROFILE",
    "LEVELS",
    "AttachedKV",
    "CacheFile",
    "CacheStream",
    "EncodeSummary",
    "LevelCodecs",
    "LoadedKV",
    "Progress",
    "Resolved",
    "UNCALIBRATED_IMPORTANCE",
    "attach_kv",
    "check_if_missing",
    "check_level",
    "check_levels",
    "chunk_ranges",
    "chunk_span",
    "codec_for_level",
    "default_threads",
    "encode_chunks",
    "find_profile",
    "is_calibrated",
    "is_digest",
    "kv_to_storage",
    "level_config",
    "level_importance",
    "list_profiles",
    "load_kv",
    "model_profile",
    "no_progress",
    "on_threads",
    "open_cache",
    "profile_dirs",
    "read_profile_file",
    "register_level",
    "register_profile_file",
    "registered_profile_files",
    "resolve",
    "run_on_threads",
    "storage_to_kv",
    "stream_prefill",
    "threads_for",
    "write_kvz",
    "write_profile",
]
