"""Reading a ``.kvz`` over any :class:`~kvzip.formats.source.ByteSource`.

Opening reads the preamble, header and index in at most two ``get_bytes`` calls
(so an HTTP reader needs at most two range requests before the first chunk),
checks their checksums and validates the whole index.  Payloads are read lazily,
one range each, and checked against their own checksum before they are decoded.
"""

from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from kvzip.codecs import STORAGE_DTYPES, ChunkContext, Codec, codec_from_config
from kvzip.codecs.base import from_float32, zstd_decompress_bounded
from kvzip.errors import (
    ChecksumError,
    CodecError,
    FormatError,
    KvzipError,
    MemoryLimitError,
    UnknownLevelError,
)
from kvzip.formats import parallel
from kvzip.formats.limits import check_memory, chunk_work_bytes
from kvzip.formats.container import (
    IndexEntry,
    KvzHeader,
    describe_entry,
    parse_header,
    parse_index,
    parse_preamble,
    validate,
)
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


class PayloadDecoder:
    """Decodes KV payloads with the codecs a header names, each codec built once per level.

    The reader uses it on payloads it read itself; a streaming client uses it on
    payloads it fetched (and checksummed) over the network.
    """

    def __init__(self, header: KvzHeader):
        self.header = header
        self._codecs: dict[int, Codec] = {}
        self._lock = threading.Lock()

    def context(self, entry: IndexEntry) -> ChunkContext:
        """What the level's codec needs to know about this chunk."""
        h = self.header
        return ChunkContext(
            token_start=entry.token_start,
            token_count=entry.token_count,
            num_layers=h.num_layers,
            kv_heads=h.kv_heads,
            head_dim=h.head_dim,
            dtype=h.dtype,
            rope_inv_freq=h.rope_inv_freq,
        )

    def level_codec(self, level: int) -> Codec:
        """The codec of level ``level``, built (and checked) once, also when decoder
        threads ask for it at the same moment (building one may load a profile)."""
        with self._lock:
            if level not in self._codecs:
                self._codecs[level] = self.codec(level)
            return self._codecs[level]

    def codec(self, level: int) -> Codec:
        """The codec of level ``level``, refusing a calibration profile made for another model."""
        codec = codec_from_config(self.header.levels[level].codec)
        profile = getattr(codec, "profile", None)
        if profile is not None:
            profile.check_model(self.header.model_fingerprint)
        return codec

    def check_chunk_memory(self, entry: IndexEntry) -> None:
        """Refuse a chunk whose decoding would take more than the memory limit."""
        ctx = self.context(entry)
        check_memory(chunk_work_bytes(int(np.prod(ctx.shape))),
                     f"decoding {describe_entry(entry, self.header.level_names)}")

    def decode_into(self, entry: IndexEntry, payload: bytes, out: np.ndarray) -> None:
        """Decode one KV chunk into ``out`` (its slice of a level's array, storage dtype)."""
        if entry.kind is not EntryKind.KV:
            raise ValueError(f"not a KV entry: {entry}")
        self.check_chunk_memory(entry)
        ctx = self.context(entry)
        if out.shape != ctx.shape:
            raise CodecError(f"{describe_entry(entry, self.header.level_names)} needs an output of shape "
                             f"{ctx.shape}, got {out.shape}")
        if ctx.dtype == "float32" and out.dtype == np.float32:
            self.level_codec(entry.level).decode_into(payload, ctx, out)
        else:
            out[...] = self.decode(entry, payload)

    def decode(self, entry: IndexEntry, payload: bytes) -> np.ndarray:
        """One KV chunk as ``[2, layers, kv_heads, tokens, head_dim]`` in the storage dtype."""
        if entry.kind is not EntryKind.KV:
            raise ValueError(f"not a KV entry: {entry}")
        self.check_chunk_memory(entry)
        ctx = self.context(entry)
        kv = self.level_codec(entry.level).decode(payload, ctx)
        if kv.shape != ctx.shape:
            raise CodecError(
                f"{describe_entry(entry, self.header.level_names)} decoded to shape "
                f"{kv.shape}, expected {ctx.shape}"
            )
        return from_float32(kv, ctx.dtype)


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
        self.header = parse_header(header_bytes)
        self.entries = tuple(parse_index(index_bytes))
        self._index = validate(self.header, self.entries, size, end)
        self._decoder = PayloadDecoder(self.header)

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
        return [self._read_text(entry) for entry in self._index.texts]

    def _read_text(self, entry: IndexEntry) -> str:
        what = f"text of chunk {entry.chunk}"
        limit = entry.token_count * MAX_TEXT_BYTES_PER_TOKEN
        raw = zstd_decompress_bounded(self.read_payload(entry), limit, what, FormatError)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not UTF-8") from None

    def chunk_context(self, entry: IndexEntry) -> ChunkContext:
        """What the level's codec needs to know about this chunk."""
        return self._decoder.context(entry)

    def decode_chunk(self, entry: IndexEntry) -> np.ndarray:
        """One KV chunk as ``[2, layers, kv_heads, tokens, head_dim]`` in the storage dtype."""
        if entry.kind is not EntryKind.KV:
            raise ValueError(f"not a KV entry: {entry}")
        return self._decoder.decode(entry, self.read_payload(entry))

    def decode_chunk_into(self, entry: IndexEntry, out: np.ndarray) -> None:
        """:meth:`decode_chunk` straight into ``out`` (e.g. the chunk's slice of a level)."""
        self._decoder.decode_into(entry, self.read_payload(entry), out)

    def decode_level(self, level_name: str, *, decoders: int | None = None) -> np.ndarray:
        """A whole level as ``[2, layers, kv_heads, token_count, head_dim]``.

        A large level is decoded in parallel (see :mod:`kvzip.formats.parallel`):
        on threads when its codec releases the GIL, else, for a local file, on
        several processes into a shared buffer.  ``decoders`` sets how many
        (1 = this thread only; default: ``KVZIP_DECODE_WORKERS`` or the CPU count,
        and one for small levels).  The result is the same either way, bit for bit.
        """
        entries = self.kv_entries(level_name)
        h = self.header
        shape = (2, h.num_layers, h.kv_heads, h.token_count, h.head_dim)
        threads = bool(entries) and self._decoder.level_codec(entries[0].level).releases_gil
        n = parallel.want_parallel(self, int(np.prod(shape)), len(entries), decoders, threads)
        self.check_level_memory(level_name, max(n, 1))
        if n > 1 and threads:
            return parallel.decode_level_threads(self, level_name, n)
        if n > 1:
            return parallel.decode_level_parallel(self, level_name, n)
        kv = np.empty(shape, dtype=STORAGE_DTYPES[h.dtype])
        parallel.decode_into(self, level_name, list(range(len(entries))), kv)
        return kv

    def level_bytes(self) -> int:
        """The size of one decoded level in the storage dtype, as the header declares it."""
        h = self.header
        return 2 * h.num_layers * h.kv_heads * h.token_count * h.head_dim * STORAGE_DTYPES[h.dtype].itemsize

    def check_level_memory(self, level_name: str, decoders: int = 1) -> None:
        """Refuse a level whose array plus ``decoders`` chunks in flight exceed the memory limit."""
        entries = self.kv_entries(level_name)
        widest = max((e.token_count for e in entries), default=0)
        h = self.header
        work = chunk_work_bytes(2 * h.num_layers * h.kv_heads * widest * h.head_dim)
        check_memory(self.level_bytes() + min(decoders, len(entries)) * work,
                     f"decoding level {level_name!r} ({h.token_count} tokens)")

    def verify(self, decode: bool = False) -> list[Problem]:
        """Check every payload's checksum (and, with ``decode``, that it decodes).

        Reports every defect instead of stopping at the first, for ``kvzip verify``.
        """
        problems = []
        for entry in self.entries:
            try:
                if not decode:
                    self.read_payload(entry)
                elif entry.kind is EntryKind.KV:
                    self.decode_chunk(entry)
                elif entry.kind is EntryKind.TOKEN_IDS:
                    self.token_ids()
                else:
                    self._read_text(entry)
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
