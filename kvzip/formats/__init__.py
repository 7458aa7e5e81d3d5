"""The ``.kvz`` container: spec constants, pure parse/validate, reader and writer.

The byte layout is documented in ``docs/format.md``.  Bytes only: this package
knows payloads and checksums, not codecs (``kvzip.levels`` decodes payloads), and
imports from kvzip only ``kvzip.errors``, ``kvzip.compression`` and ``kvzip.atomic``.
"""

from kvzip.formats.container import (
    ChatInfo,
    ChunkIndex,
    IndexEntry,
    KvzHeader,
    ModelInfo,
    Preamble,
    ProfileInfo,
    QualityLevel,
    SourceInfo,
    describe_entry,
    encode_header,
    new_header,
    pack_index,
    pack_preamble,
    parse_header,
    parse_index,
    parse_preamble,
    validate,
)
from kvzip.formats.layout import Block, LayeredKV, PositionLayout
from kvzip.formats.reader import KvzReader, Problem, open_kvz
from kvzip.formats.source import ByteSource, BytesSource, FileSource, checked_range
from kvzip.formats.spec import MAGIC, VERSION_MAJOR, VERSION_MINOR, EntryKind
from kvzip.formats.writer import KvzWriter

__all__ = [
    "Block",
    "LayeredKV",
    "PositionLayout",
    "ChatInfo",
    "ModelInfo",
    "ProfileInfo",
    "SourceInfo",
    "new_header",
    "MAGIC",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "ByteSource",
    "BytesSource",
    "ChunkIndex",
    "EntryKind",
    "FileSource",
    "IndexEntry",
    "KvzHeader",
    "KvzReader",
    "KvzWriter",
    "Preamble",
    "Problem",
    "QualityLevel",
    "checked_range",
    "describe_entry",
    "encode_header",
    "open_kvz",
    "pack_index",
    "pack_preamble",
    "parse_header",
    "parse_index",
    "parse_preamble",
    "validate",
]
