"""Writing a ``.kvz`` atomically.

Payloads arrive one by one (chunk by chunk, level by level) and spill to a
temporary file beside the target, so memory stays flat however large the
context.  :meth:`KvzWriter.commit` lays the file out in a fixed order, validates
it with the reader's own rules, fsyncs it and renames it onto the target; until
then the target is untouched, and on any failure every temporary file is removed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import zstandard

from kvzip import atomic
from kvzip.formats.container import (
    IndexEntry,
    Preamble,
    encode_header,
    pack_index,
    pack_preamble,
    parse_header,
    validate,
)
from kvzip.formats.spec import (
    FORMAT_NAME,
    INDEX_ENTRY_SIZE,
    MAX_TEXT_BYTES_PER_TOKEN,
    PREAMBLE_SIZE,
    U32_MAX,
    EntryKind,
)

# Token ids and texts are tiny next to the KV payloads; a middling level is plenty.
_AUX_ZSTD_LEVEL = 9
_COPY_PIECE = 1 << 20


class KvzWriter:
    """Collects payloads for one ``.kvz`` and writes it on :meth:`commit`.

    ``header`` holds the header fields of docs/format.md; ``format`` may be left
    out (the writer sets it).  Use as a context manager: leaving the block
    without a successful commit (by an exception or by forgetting) removes every
    temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]):
        self.path = Path(path)
        self._header_bytes = encode_header({"format": FORMAT_NAME, **header})
        self.header = parse_header(self._header_bytes)  # what readers will see
        self._entries: list[IndexEntry] = []  # offsets relative to the spill file
        fd, self._spill_path = atomic.create_temp(self.path, "spill", mode=0o600)
        self._spill: IO[bytes] = os.fdopen(fd, "w+b")
        self._spill_size = 0
        self._closed = False

    def add_kv(
        self, chunk: int, level: int, token_start: int, token_count: int, payload: bytes
    ) -> None:
        """One chunk's payload for the level at index ``level`` of the header's levels."""
        self._add(EntryKind.KV, level, chunk, token_start, token_count, payload)

    def set_token_ids(self, token_ids: Any) -> None:
        """The context's token ids (a 1-D integer array of values in [0, 2**32))."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > U32_MAX):
            raise ValueError("token ids must lie in [0, 2**32)")
        payload = _compress(ids.astype("<u4").tobytes())
        self._add(EntryKind.TOKEN_IDS, 0, 0, 0, len(ids), payload)

    def add_text(self, chunk: int, token_start: int, token_count: int, text: str) -> None:
        """One chunk's text, for clients that recompute a chunk instead of fetching it."""
        data = text.encode("utf-8")
        if len(data) > token_count * MAX_TEXT_BYTES_PER_TOKEN:
            raise ValueError(
                f"chunk {chunk} text is {len(data)} bytes, more than "
                f"{MAX_TEXT_BYTES_PER_TOKEN} per token"
            )
        self._add(EntryKind.TEXT, 0, chunk, token_start, token_count, _compress(data))

    def _add(
        self,
        kind: EntryKind,
        level: int,
        chunk: int,
        token_start: int,
        token_count: int,
        payload: bytes,
    ) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        if not 0 <= level <= 0xFF or not all(
            0 <= v <= U32_MAX for v in (chunk, token_start, token_count)
        ):
            raise ValueError(
                f"level must fit in u8 and chunk, token_start, token_count in u32: "
                f"{level}, {chunk}, {token_start}, {token_count}"
            )
        self._spill.write(payload)
        self._entries.append(
            IndexEntry(
                kind,
                level,
                chunk,
                token_start,
                token_count,
                offset=self._spill_size,
                length=len(payload),
                crc32=zlib.crc32(payload),
            )
        )
        self._spill_size += len(payload)

    def commit(self) -> None:
        """Write the file beside the target, validate, fsync, and rename onto the target."""
        if self._closed:
            raise ValueError("writer is closed")
        # Token ids first, then chunk by chunk (each chunk's levels, then its text),
        # so a file's bytes never depend on the order payloads were added.
        spilled = sorted(self._entries, key=_layout_order)
        data_offset = PREAMBLE_SIZE + len(self._header_bytes) + INDEX_ENTRY_SIZE * len(spilled)
        placed, position = [], data_offset
        for entry in spilled:
            placed.append(replace(entry, offset=position))
            position += entry.length
        index = pack_index(placed)
        preamble = pack_preamble(Preamble.for_sections(self._header_bytes, index, self.header.major))

        self._spill.flush()
        with atomic.atomic_output(self.path) as out_path, open(out_path, "wb") as out:
            out.write(preamble)
            out.write(self._header_bytes)
            out.write(index)
            for entry in spilled:
                self._copy_payload(entry, out)
            out.flush()
            validate(self.header, placed, os.fstat(out.fileno()).st_size, data_offset)
        self.close()

    def _copy_payload(self, entry: IndexEntry, out: IO[bytes]) -> None:
        self._spill.seek(entry.offset)
        remaining = entry.length
        while remaining:
            piece = self._spill.read(min(remaining, _COPY_PIECE))
            if not piece:
                raise OSError(f"spill file {self._spill_path} ended early")
            out.write(piece)
            remaining -= len(piece)

    def close(self) -> None:
        """Discard the spilled payloads; after :meth:`commit` this is a no-op."""
        if not self._closed:
            self._closed = True
            self._spill.close()
            atomic.discard(self._spill_path)

    def __enter__(self) -> KvzWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _layout_order(entry: IndexEntry) -> tuple[bool, int, int, int]:
    return entry.kind is not EntryKind.TOKEN_IDS, entry.chunk, entry.kind, entry.level


def _compress(data: bytes) -> bytes:
    # The frame declares its content size; readers rely on it to bound decompression.
    return zstandard.ZstdCompressor(level=_AUX_ZSTD_LEVEL, write_content_size=True).compress(data)

