"""Constants of the ``.kvz`` v1 container; ``docs/format.md`` is their prose twin.

Every cap here exists so that a hostile file cannot make a reader allocate or
loop without bound: each size a file declares is checked against one of them
before anything is read or allocated.
"""

from __future__ import annotations

import struct
from enum import IntEnum

MAGIC = b"\x89KVZ\r\n\x1a\n"
FORMAT_NAME = "kvz"  # the header's "format" field
# The newest version this kvzip writes and reads; it reads every major in READ_MAJORS.
# A writer writes the oldest version that can describe the file: a dense cache whose
# layers share one RoPE table is a 1.0 file, byte for byte what earlier kvzip wrote.
VERSION_MAJOR = 2
VERSION_MINOR = 0
READ_MAJORS = (1, 2)
# What a 2.x header's "features" may list.  A reader refuses a file that needs a
# feature it does not know, naming it; 1.x readers refuse every 2.x file by its major.
FEATURES = (
    "positions",  # per (layer, kv head) sets of stored positions (header field "positions")
    "rope-tables",  # several RoPE tables, one per layer (header field "rope.tables")
)

# magic, major, minor, flags, header_length, index_length, header_crc, index_crc, data_offset
PREAMBLE = struct.Struct("<8sHHIQQIIQ")
PREAMBLE_SIZE = PREAMBLE.size  # 48

# kind, level, reserved, chunk, token_start, token_count, offset, length, crc32, reserved
INDEX_ENTRY = struct.Struct("<BBHIIIQQII")
INDEX_ENTRY_SIZE = INDEX_ENTRY.size  # 40

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

MAX_HEADER_BYTES = 16 << 20
MAX_INDEX_ENTRIES = 1 << 20
# K and V elements of one chunk (2 * layers * heads * head_dim * chunk_tokens).
MAX_CHUNK_ELEMENTS = 1 << 31
# Bounds the token-id payload (4 bytes per token) and every whole-file loop.
MAX_TOKEN_COUNT = 1 << 24
# A chunk's text may hold at most this many UTF-8 bytes per token; real
# tokenizers stay far below (their longest tokens are a few dozen bytes).
MAX_TEXT_BYTES_PER_TOKEN = 1024
# u8 level field in the index.
MAX_LEVELS = 256

# The reader's first read; header + index usually fit, else one more read follows.
FIRST_READ_BYTES = 64 << 10

DTYPES = ("float32", "float16", "bfloat16")


class EntryKind(IntEnum):
    """What an index entry's payload holds; v1 readers know exactly these."""

    KV = 0  # one chunk of one quality level, encoded by that level's codec
    TOKEN_IDS = 1  # zstd of the little-endian uint32 token ids, one entry per file
    TEXT = 2  # zstd of one chunk's UTF-8 text, optional, one per chunk
