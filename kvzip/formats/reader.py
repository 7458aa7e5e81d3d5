"""Reading a ``.kvz`` over any :class:`~kvzip.formats.source.ByteSource`.

Opening reads the preamble, header and index in at most two ``get_bytes`` calls
(so an HTTP reader needs at most two range requests before the first chunk),
checks their checksums and validates the whole index.  Payloads are read lazily,
one range each, and checked against their own checksum before they are decoded.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvzip.compression import zstd_decompress_bounded
from kvzip.errors import (
    ChecksumError,
    FormatError,
    KvzipError,
    MemoryLimitError,
    UnknownLevelError,
)
from kvzip.formats.container import (
    IndexEntry,
    describe_entry,
    parse_header,
    parse_index,
    parse_preamble,
    validate,
)
from kvzip.formats.limits import check_memory
from kvzip.formats.source import ByteSource, FileSource
from kvzip.formats.spec import (
    FIRST_READ_BYTES,
    MAX_TEXT_BYTES_PER_TOKEN,
    PREAMBLE_SIZE,
    EntryKind,
)


@dataclass(frozen=True)
class Problem:
    """One defect :meth:`KvzReader.verify` found."""

    entry: IndexEntry
    message: str


class KvzReader:
    """A validated ``.kvz``: header and index parsed up front, payloads on demand."""

    def __init__(self, source: ByteSource):
        self.source = source
        size = source.size()
        head = source.get_bytes(0, min(size, FIRST_READ_BYTES))
        self.preamble = parse_preamble(head)
        end = self.preamble.data_offset
        if end > len(head):
            head += source.get_bytes(len(head), end - len(head))
        header_end = PREAMBLE_SIZE + self.preamble.header_length
        header_bytes, index_bytes = head[PREAMBLE_SIZE:header_end], head[header_end:end]
        _check_crc(header_bytes, self.preamble.header_crc, "header")
        _check_crc(index_bytes, self.preamble.index_crc, "chunk index")
        self.header = parse_header(header_bytes, self.preamble.major)
        self.entries = tuple(parse_index(index_bytes))
        self._index = validate(self.header, self.entries, size, end)

    @property
    def version(self) -> tuple[int, int]:
        return self.preamble.major, self.preamble.minor

    def kv_entries(self, level_name: str) -> list[IndexEntry]:
        """The KV entries of one stored level, in chunk (= token) order."""
        try:
            level = self.header.level_index(level_name)
        except KeyError:
            raise UnknownLevelError(
                f"this file has no level {level_name!r} "
                f"(it has: {', '.join(self.header.level_names)})"
            ) from None
        return list(self._index.kv[level])

    def read_payload(self, entry: IndexEntry) -> bytes:
        """An entry's payload bytes, checked against the index's checksum."""
        data = self.source.get_bytes(entry.offset, entry.length)
        actual = zlib.crc32(data)
        if actual != entry.crc32:
            raise ChecksumError(
                f"{describe_entry(entry, self.header.level_names)}: checksum mismatch "
                f"(stored {entry.crc32:08x}, computed {actual:08x})"
            )
        return data

    def token_ids(self) -> np.ndarray:
        """The context's token ids, as int64."""
        entry = self._index.token_ids
        check_memory(12 * entry.token_count, "the token ids")  # the u32 bytes and the int64 array
        raw = zstd_decompress_bounded(
            self.read_payload(entry), 4 * entry.token_count, "token ids", FormatError
        )
        if len(raw) != 4 * entry.token_count:
            raise FormatError(f"token ids hold {len(raw)} bytes, expected {4 * entry.token_count}")
        return np.frombuffer(raw, dtype="<u4").astype(np.int64)

    def chunk_texts(self) -> list[str] | None:
        """Each chunk's text, or None when the file stores no texts."""
        if self._index.texts is None:
            return None
        return [self.read_text(entry) for entry in self._index.texts]

    def read_text(self, entry: IndexEntry) -> str:
        """One chunk's text (a TEXT entry), checked and unpacked."""
        what = f"text of chunk {entry.chunk}"
        limit = entry.token_count * MAX_TEXT_BYTES_PER_TOKEN
        raw = zstd_decompress_bounded(self.read_payload(entry), limit, what, FormatError)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not UTF-8") from None

    def verify(self, check_kv: Callable[[IndexEntry], object] | None = None) -> list[Problem]:
        """Check every payload's checksum (and that token ids and texts unpack); every
        defect is reported, not only the first, for ``kvzip verify``.  ``check_kv``
        (default: the checksum) checks a KV entry further: the levels layer decodes it
        (``kvzip.levels.CacheFile.verify``)."""
        problems = []
        for entry in self.entries:
            try:
                if entry.kind is EntryKind.TOKEN_IDS:
                    self.token_ids()
                elif entry.kind is EntryKind.TEXT:
                    self.read_text(entry)
                else:
                    (check_kv or self.read_payload)(entry)
            except MemoryLimitError:
                raise  # the file may be fine; this machine's limit is not a defect of it
            except KvzipError as exc:
                problems.append(Problem(entry, str(exc)))
        return problems

    def close(self) -> None:
        """Close the source if it holds a resource (a file, a connection)."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> KvzReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_kvz(path: str | os.PathLike[str]) -> KvzReader:
    """Open a local ``.kvz``; the reader owns the file until closed."""
    source = FileSource(path)
    try:
        return KvzReader(source)
    except BaseException:
        source.close()
        raise


def _check_crc(data: bytes, expected: int, what: str) -> None:
    actual = zlib.crc32(data)
    if actual != expected:
        raise ChecksumError(
            f"{what} checksum mismatch (stored {expected:08x}, computed {actual:08x})"
        )
