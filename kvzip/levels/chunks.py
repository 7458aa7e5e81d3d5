"""A file's levels as codecs: payload bytes <-> cache arrays, one chunk at a time.

:class:`LevelCodecs` is the one object that turns the payloads a header
describes into arrays and back: it builds each level's codec once (handing it
the calibration profile its config names), prices a chunk's decode against the
memory limit before it allocates, and checks the decoded shape.  A reader of a
local file (:class:`~kvzip.levels.files.CacheFile`) and the streaming client,
which fetched its payloads over the network, both decode through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from kvzip.codecs import STORAGE_DTYPES, ChunkContext, Codec, codec_from_config
from kvzip.codecs.base import from_float32
from kvzip.errors import CodecError
from kvzip.formats import IndexEntry, KvzHeader, describe_entry
from kvzip.formats.limits import check_memory, chunk_work_bytes
from kvzip.formats.spec import EntryKind
from kvzip.levels.executor import run_on_threads, threads_for
from kvzip.levels.profiles import find_profile


class LevelCodecs:
    """The codecs of a header's levels, each built (and checked) once, on first use.

    A level whose codec names a calibration profile gets the profile found in the
    profile directories, checked to belong to the file's model; a file whose
    other levels need a missing profile still decodes the levels that do not.
    """

    def __init__(self, header: KvzHeader):
        self.header = header
        self._codecs: dict[int, Codec] = {}
        self._lock = threading.Lock()

    def codec(self, level: int) -> Codec:
        """The codec of level ``level`` (an index into the header's levels)."""
        with self._lock:  # decoder threads may ask at the same moment; build it once
            if level not in self._codecs:
                spec = self.header.levels[level]
                profile = None
                if spec.profile is not None:
                    profile = find_profile(spec.profile)
                    profile.check_model(self.header.model_fingerprint)
                self._codecs[level] = codec_from_config(spec.codec, profile)
            return self._codecs[level]

    def context(self, entry: IndexEntry) -> ChunkContext:
        """What the level's codec needs to know about this chunk."""
        h = self.header
        return ChunkContext(
            token_start=entry.token_start, token_count=entry.token_count,
            num_layers=h.num_layers, kv_heads=h.kv_heads, head_dim=h.head_dim,
            dtype=h.dtype, rope_inv_freq=h.rope_inv_freq,
        )

    def check_chunk_memory(self, entry: IndexEntry) -> None:
        """Refuse a chunk whose decoding would take more than the memory limit."""
        check_memory(chunk_work_bytes(int(np.prod(self.context(entry).shape))),
                     f"decoding {describe_entry(entry, self.header.level_names)}")

    def decode(self, entry: IndexEntry, payload: bytes) -> np.ndarray:
        """One KV chunk as ``[2, layers, kv_heads, tokens, head_dim]`` in the storage dtype."""
        _require_kv(entry)
        self.check_chunk_memory(entry)
        return self._decode(entry, payload, self.context(entry))

    def _decode(self, entry: IndexEntry, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        kv = self.codec(entry.level).decode(payload, ctx)
        if kv.shape != ctx.shape:
            raise CodecError(f"{describe_entry(entry, self.header.level_names)} decoded to shape "
                             f"{kv.shape}, expected {ctx.shape}")
        return from_float32(kv, ctx.dtype)

    def decode_into(self, entry: IndexEntry, payload: bytes, out: np.ndarray) -> None:
        """Decode one KV chunk into ``out`` (its slice of a level's array, storage dtype)."""
        _require_kv(entry)
        self.check_chunk_memory(entry)
        ctx = self.context(entry)
        if out.shape != ctx.shape:
            raise CodecError(f"{describe_entry(entry, self.header.level_names)} needs an output of shape "
                             f"{ctx.shape}, got {out.shape}")
        if ctx.dtype == "float32" and out.dtype == np.float32:
            self.codec(entry.level).decode_into(payload, ctx, out)
        else:
            out[...] = self._decode(entry, payload, ctx)

    def level_array(self) -> np.ndarray:
        """An uninitialised ``[2, L, H, T, D]`` array in the storage dtype for a whole level."""
        h = self.header
        return np.empty((2, h.num_layers, h.kv_heads, h.token_count, h.head_dim), STORAGE_DTYPES[h.dtype])


def _require_kv(entry: IndexEntry) -> None:
    if entry.kind is not EntryKind.KV:
        raise ValueError(f"not a KV entry: {entry}")


def chunk_ranges(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``(start, count)`` of each chunk of a context, the last one possibly short."""
    return [(start, min(chunk_tokens, n_tokens - start)) for start in range(0, n_tokens, chunk_tokens)]


def encode_chunks(
    array: np.ndarray,
    codecs: Sequence[Codec],
    ranges: Sequence[tuple[int, int]],
    ctx: ChunkContext,
    threads: int | None = None,
    done: Callable[[int], None] | None = None,
) -> list[list[bytes]]:
    """Every chunk (``ranges`` of ``array``'s tokens, [2, L, H, T, D]) coded with every
    codec: ``payloads[chunk][level]``.  Chunks are coded side by side on threads when
    every codec releases the GIL (``threads``: how many; default by size).  A codec's
    output depends only on its config and the chunk, so the bytes do not depend on
    the number of threads.  ``done(n)`` is called on this thread with the chunks done."""
    results: list[list[bytes] | None] = [None] * len(ranges)
    finished = [0]
    lock = threading.Lock()

    def encode(i: int) -> None:
        start, count = ranges[i]
        piece = np.ascontiguousarray(array[:, :, :, start : start + count, :])
        c = ChunkContext(start, count, ctx.num_layers, ctx.kv_heads, ctx.head_dim, ctx.dtype,
                         ctx.rope_inv_freq)
        payloads = [codec.encode(piece, c) for codec in codecs]
        with lock:
            results[i] = payloads
            finished[0] += 1

    n = threads_for(codecs, array.size, len(ranges), threads)
    run_on_threads(len(ranges), n, encode, None if done is None else lambda: done(finished[0]))
    if done is not None:
        done(finished[0])
    return results  # type: ignore[return-value]
