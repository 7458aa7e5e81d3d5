"""A file's levels as codecs: payload bytes <-> cache arrays, one chunk at a time.

:class:`LevelCodecs` is the one object that turns the payloads a header
describes into arrays and back: it builds each level's codec once (handing it
the calibration profile its config names), prices a chunk's decode against the
memory limit before it allocates, and checks the decoded shape.  A reader of a
local file (:class:`~kvzip.levels.files.CacheFile`) and the streaming client,
which fetched its payloads over the network, both decode through it.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import Callable, Sequence

import numpy as np

from kvzip.codecs import STORAGE_DTYPES, ChunkContext, Codec, codec_from_config
from kvzip.codecs.base import from_float32
from kvzip.errors import CodecError
from kvzip.formats import Block, IndexEntry, KvzHeader, LayeredKV, PositionLayout, describe_entry
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
        """What the level's codec needs to know about this chunk (of a dense file)."""
        h = self.header
        return ChunkContext(
            token_start=entry.token_start, token_count=entry.token_count,
            num_layers=h.num_layers, kv_heads=h.kv_heads, head_dim=h.head_dim,
            dtype=h.dtype, rope_inv_freq=h.rope_inv_freq,
        )

    def blocks(self, entry: IndexEntry) -> list[tuple[Block, ChunkContext]]:
        """The blocks a 2.x chunk is coded in, each with its codec context."""
        return chunk_blocks(self.header, *entry.token_range)

    def block_payloads(self, entry: IndexEntry, payload: bytes) -> list[tuple[Block, ChunkContext, bytes]]:
        """A 2.x chunk's blocks, each with its codec context and its part of ``payload``."""
        blocks = self.blocks(entry)
        parts = unframe_blocks(payload, len(blocks), describe_entry(entry, self.header.level_names))
        return [(block, ctx, part) for (block, ctx), part in zip(blocks, parts)]

    def chunk_elements(self, entry: IndexEntry) -> int:
        """K and V elements the chunk decodes to."""
        return chunk_elements(self.header, *entry.token_range)

    def check_chunk_memory(self, entry: IndexEntry) -> None:
        """Refuse a chunk whose decoding would take more than the memory limit."""
        check_memory(chunk_work_bytes(self.chunk_elements(entry)),
                     f"decoding {describe_entry(entry, self.header.level_names)}")

    def decode(self, entry: IndexEntry, payload: bytes) -> np.ndarray:
        """One KV chunk of a dense file as ``[2, layers, kv_heads, tokens, head_dim]`` in the
        storage dtype (:meth:`decode_layers` decodes any file's)."""
        _require_kv(entry)
        if not self.header.is_dense:
            raise ValueError("a 2.x chunk with a position layout decodes per layer (decode_layers)")
        self.check_chunk_memory(entry)
        return self._decode(entry, payload, self.context(entry))

    def decode_layers(self, entry: IndexEntry, payload: bytes) -> list[np.ndarray]:
        """One KV chunk as each layer's ``[2, kv_heads, n, head_dim]`` (storage dtype): the
        positions the layout gives that layer inside the chunk, in order (n may be 0)."""
        _require_kv(entry)
        if self.header.is_dense:
            kv = self.decode(entry, payload)
            return [kv[:, i] for i in range(kv.shape[1])]
        self.check_chunk_memory(entry)
        h = self.header
        start, end = entry.token_range
        layout = h.layout
        out = [np.zeros((2, h.kv_heads, layout_width(layout, i, start, end), h.head_dim),
                        STORAGE_DTYPES[h.dtype]) for i in range(h.num_layers)]
        for block, ctx, part in self.block_payloads(entry, payload):
            kv = self._decode(entry, part, ctx)
            for j, layer in enumerate(block.layers):
                # the block's heads hold the same positions in this chunk: one offset in it
                h0 = block.heads[0]
                at = layout.slot(layer, h0, int(block.positions[0])) - layout.slot(layer, h0, start)
                out[layer][:, list(block.heads), at : at + block.count] = kv[:, j]
        return out

    def class_bits(self, entry: IndexEntry, payload: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        """(elements, payload bits) per importance class of a chunk whose level codes by
        class (``--importance``), else None (see :meth:`StagePipeline.class_bits`)."""
        _require_kv(entry)
        self.check_chunk_memory(entry)
        codec = self.codec(entry.level)
        pipeline_for = getattr(codec, "pipeline_for", None)
        if pipeline_for is None:
            return None
        if self.header.is_dense:
            pieces = [(payload, self.context(entry))]
        else:
            pieces = [(part, ctx) for _, ctx, part in self.block_payloads(entry, payload)]
        k = len(codec.params().get("importance_factors") or ())
        if not k:
            return None
        elements, bits = np.zeros(k, np.int64), np.zeros(k)  # a chunk may hold no kept entry
        for part, ctx in pieces:
            codec.check_chunk(ctx)
            got = pipeline_for(ctx).class_bits(part, ctx)
            if got is None:
                return None
            elements, bits = elements + got[0], bits + got[1]
        return elements, bits

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
        """An uninitialised ``[2, L, H, T, D]`` array in the storage dtype for a whole level
        of a dense file."""
        h = self.header
        return np.empty((2, h.num_layers, h.kv_heads, h.token_count, h.head_dim), STORAGE_DTYPES[h.dtype])

    def level_layers(self) -> LayeredKV:
        """Zeroed arrays, one per layer, for a whole level of any file (dense: views of
        :meth:`level_array`)."""
        h = self.header
        if h.is_dense:
            return LayeredKV.from_dense(self.level_array())
        dtype = STORAGE_DTYPES[h.dtype]
        return LayeredKV([np.zeros((2, h.kv_heads, h.layout.layer_width(i), h.head_dim), dtype)
                          for i in range(h.num_layers)], h.layout)


def chunk_elements(header: KvzHeader, start: int, end: int) -> int:
    """K and V elements the chunk ``[start, end)`` holds: every layer and head's positions
    there, what decoding it costs (and what the streaming controller prices)."""
    if header.is_dense:
        return 2 * header.num_layers * header.kv_heads * (end - start) * header.head_dim
    return 2 * header.layout.chunk_stored(start, end) * header.head_dim


def layout_width(layout: PositionLayout, layer: int, start: int, end: int) -> int:
    """Slots of layer ``layer`` inside ``[start, end)``: its widest head's count there."""
    return max(int(layout.in_range(layer, h, start, end).size) for h in range(layout.kv_heads))


def chunk_blocks(header: KvzHeader, start: int, end: int) -> list[tuple[Block, ChunkContext]]:
    """The codec blocks of the chunk ``[start, end)`` of a 2.x file, with their contexts."""
    tables = None if header.rope_tables is None else header.layer_rope
    out = []
    for block in header.layout.blocks(start, end, tables):
        rope = None if block.rope_table is None else header.rope_tables[block.rope_table]
        out.append((block, ChunkContext(
            token_start=int(block.positions[0]), token_count=block.count,
            num_layers=len(block.layers), kv_heads=len(block.heads), head_dim=header.head_dim,
            dtype=header.dtype, rope_inv_freq=rope,
            layer_ids=block.layers, head_ids=block.heads, positions=block.positions)))
    return out


_FRAME = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def frame_blocks(parts: Sequence[bytes]) -> bytes:
    """A 2.x chunk payload: ``u32`` block count, a ``u64`` length per block, the blocks."""
    return b"".join([_FRAME.pack(len(parts)), *(_LENGTH.pack(len(p)) for p in parts), *parts])


def unframe_blocks(payload: bytes, expected: int, what: str) -> list[bytes]:
    if len(payload) < _FRAME.size:
        raise CodecError(f"{what}: payload too short for its block count")
    (count,) = _FRAME.unpack_from(payload)
    if count != expected:
        raise CodecError(f"{what}: payload holds {count} blocks, the position layout {expected}")
    at = _FRAME.size + count * _LENGTH.size
    if len(payload) < at:
        raise CodecError(f"{what}: payload too short for its block lengths")
    parts = []
    for i in range(count):
        (n,) = _LENGTH.unpack_from(payload, _FRAME.size + i * _LENGTH.size)
        if n > len(payload) - at:
            raise CodecError(f"{what}: block {i} runs past the payload")
        parts.append(payload[at : at + n])
        at += n
    if at != len(payload):
        raise CodecError(f"{what}: payload has bytes after its last block")
    return parts


def _require_kv(entry: IndexEntry) -> None:
    if entry.kind is not EntryKind.KV:
        raise ValueError(f"not a KV entry: {entry}")


def chunk_ranges(n_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """``(start, count)`` of each chunk of a context, the last one possibly short."""
    return [(start, min(chunk_tokens, n_tokens - start)) for start in range(0, n_tokens, chunk_tokens)]


def encode_chunks(
    array: np.ndarray | LayeredKV,
    codecs: Sequence[Codec],
    ranges: Sequence[tuple[int, int]],
    ctx: ChunkContext | KvzHeader,
    threads: int | None = None,
    done: Callable[[int], None] | None = None,
    importance: Sequence[np.ndarray] | None = None,
) -> list[list[bytes]]:
    """Every chunk (``ranges`` of the context's tokens) coded with every codec:
    ``payloads[chunk][level]``.  ``array`` is a dense ``[2, L, H, T, D]`` array with
    ``ctx`` a template context, or a :class:`LayeredKV` (storage dtype) with ``ctx`` the
    file's header: a dense one codes exactly as the array would, one with a position
    layout codes each chunk's blocks (:func:`chunk_blocks`) into one framed payload.
    Chunks are coded side by side on threads when every codec releases the GIL
    (``threads``: how many; default by size).  A codec's output depends only on its
    config and the chunk, so the bytes do not depend on the number of threads.
    ``done(n)`` is called on this thread with the chunks done.  ``importance``: each
    layer's ``[heads, n]`` importance classes (aligned with the cache's layers), handed to
    the codecs with each chunk (codecs built with ``importance_factors`` use them)."""
    if isinstance(array, LayeredKV) and not array.is_dense:
        def encode(i: int) -> list[bytes]:
            start, count = ranges[i]
            return encode_layered_chunk(array, codecs, ctx, start, count, importance)

        return code_chunks(encode, codecs, array.elements(), len(ranges), threads, done)
    dense_classes = None
    if isinstance(array, LayeredKV):
        ctx = dense_context(ctx)
        array = array.dense
        if importance is not None:
            dense_classes = np.stack([np.asarray(c, np.uint8) for c in importance])  # [L, H, T]

    def encode_dense(i: int) -> list[bytes]:
        start, count = ranges[i]
        return encode_dense_chunk(array, codecs, ctx, start, count, dense_classes)

    return code_chunks(encode_dense, codecs, array.size, len(ranges), threads, done)


def dense_context(header: KvzHeader) -> ChunkContext:
    """The template context of a dense file's chunks (each chunk fills in its tokens)."""
    return ChunkContext(0, 0, header.num_layers, header.kv_heads, header.head_dim, header.dtype,
                        header.rope_inv_freq)


def encode_dense_chunk(array: np.ndarray, codecs: Sequence[Codec], ctx: ChunkContext, start: int, count: int,
                       classes: np.ndarray | None = None, offset: int = 0) -> list[bytes]:
    """The chunk ``[start, start + count)`` of a dense ``[2, L, H, n, D]`` array whose first
    token is position ``offset`` (the whole context's array: 0), coded with every codec;
    ``classes``: ``[L, H, n]`` importance classes aligned with ``array``."""
    at = start - offset
    piece = np.ascontiguousarray(array[:, :, :, at : at + count, :])
    c = ChunkContext(start, count, ctx.num_layers, ctx.kv_heads, ctx.head_dim, ctx.dtype,
                     ctx.rope_inv_freq, importance=None if classes is None
                     else np.ascontiguousarray(classes[:, :, at : at + count]))
    return [codec.encode(piece, c) for codec in codecs]


def encode_layered_chunk(kv: LayeredKV, codecs: Sequence[Codec], header: KvzHeader, start: int, count: int,
                         importance: Sequence[np.ndarray] | None = None) -> list[bytes]:
    """The chunk ``[start, start + count)`` of a 2.x file coded with every codec, one framed
    payload per codec.  ``kv`` holds (at least) the positions the header's layout gives that
    chunk: the whole context's cache, or just the chunk's (a streamed prefill)."""
    parts: list[list[bytes]] = [[] for _ in codecs]
    for block, c in chunk_blocks(header, start, start + count):
        piece = block_array(kv, block)
        if importance is not None:
            c = dataclasses.replace(c, importance=block_array(kv, block, importance).astype(np.uint8))
        for level, codec in enumerate(codecs):
            parts[level].append(codec.encode(piece, c))
    return [frame_blocks(p) for p in parts]


def code_chunks(encode: Callable[[int], list[bytes]], codecs: Sequence[Codec], elements: int,
                 chunks: int, threads: int | None, done: Callable[[int], None] | None) -> list[list[bytes]]:
    """``encode(i)`` for every chunk, side by side on threads when the codecs allow it;
    ``done(n)`` on this thread with the chunks done."""
    results: list[list[bytes] | None] = [None] * chunks
    finished = [0]
    lock = threading.Lock()

    def run(i: int) -> None:
        payloads = encode(i)
        with lock:
            results[i] = payloads
            finished[0] += 1

    n = threads_for(codecs, elements, chunks, threads)
    run_on_threads(chunks, n, run, None if done is None else lambda: done(finished[0]))
    if done is not None:
        done(finished[0])
    return results  # type: ignore[return-value]


def block_array(kv: LayeredKV, block: Block, per_layer: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """A block's ``[2, layers, heads, n, head_dim]`` gathered from a cache's layers (or,
    with ``per_layer``, the block's ``[layers, heads, n]`` of those per-entry arrays)."""
    pieces = []
    for layer in block.layers:
        heads = []
        for h in block.heads:  # each head's own slots: the heads share the block's positions, but
            # not necessarily the ones before it (entries kept per head in earlier chunks)
            at = kv.layout.slot(layer, h, int(block.positions[0]))
            if per_layer is None:
                heads.append(kv.layers[layer][:, h, at : at + block.count])
            else:
                heads.append(np.asarray(per_layer[layer])[h, at : at + block.count])
        pieces.append(np.stack(heads, axis=1 if per_layer is None else 0))
    return np.ascontiguousarray(np.stack(pieces, axis=1 if per_layer is None else 0))
