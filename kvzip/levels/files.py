"""The core both ways: a captured cache tensor <-> a ``.kvz`` file.

:func:`write_kvz` codes a cache's chunks with the levels' codecs and hands the
payloads to the container's writer; :func:`open_cache` opens a file for
decoding (:class:`CacheFile`: the container's reader plus the levels' codecs)
and :func:`load_kv` decodes one level of it into a tensor.  ``kvzip.api``,
``kvzip.stream``, ``kvzip.store`` and ``kvzip.bench`` all go through here, so
there is one path between tensors and files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvzip import __version__
from kvzip.codecs import STORAGE_DTYPES, Codec
from kvzip.codecs.profile import Profile
from kvzip.errors import UnknownLevelError
from kvzip.formats import (
    ByteSource,
    ChatInfo,
    IndexEntry,
    KvzHeader,
    KvzReader,
    KvzWriter,
    LayeredKV,
    PositionLayout,
    Problem,
    ProfileInfo,
    SourceInfo,
    new_header,
    open_kvz,
)
from kvzip.formats.limits import (
    check_memory,
    chunk_work_bytes,
    memory_limit,
    release_free_memory,
    stream_threads,
)
from kvzip.formats.spec import EntryKind
from kvzip.levels.chunks import (
    LevelCodecs,
    chunk_ranges,
    code_chunks,
    dense_context,
    encode_chunks,
    encode_dense_chunk,
    encode_layered_chunk,
)
from kvzip.levels.executor import run_on_threads, threads_for
from kvzip.levels.progress import Progress, no_progress
from kvzip.levels.table import codec_for_level

if TYPE_CHECKING:  # torch and the model load when a model is used, not to read a file
    import torch

    from kvzip.model import KVModel

DEFAULT_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 16 * DEFAULT_CHUNK_TOKENS  # the widest span a pruned file's chunk gets by default


def chunk_span(chunk_tokens: int | None = None, keep: float | None = None) -> int:
    """Positions per chunk: ``chunk_tokens`` where given, else :data:`DEFAULT_CHUNK_TOKENS`
    widened for a file that keeps the fraction ``keep`` of its entries.

    Each chunk pays its rows' entropy side information once.  A pruned chunk spanning the
    dense span would hold ``keep`` times the entries for the same side information (0.15 bits
    per kept entry more at ``--keep 0.5``, measured), so by default it spans about
    ``DEFAULT_CHUNK_TOKENS / keep`` positions (a multiple of 64, at most
    :data:`MAX_CHUNK_TOKENS`) and holds about as many entries per head as a dense chunk.
    """
    if chunk_tokens is not None:
        return chunk_tokens
    if keep is None or keep >= 1:
        return DEFAULT_CHUNK_TOKENS
    span = 64 * round(DEFAULT_CHUNK_TOKENS / keep / 64)
    return min(MAX_CHUNK_TOKENS, max(DEFAULT_CHUNK_TOKENS, span))


def is_accelerator(device: Any) -> bool:
    """Whether ``device`` is an accelerator (:func:`kvzip.model.device.is_accelerator`)."""
    from kvzip.model.device import is_accelerator as accelerator

    return accelerator(device)


def kv_to_storage(kv: torch.Tensor, dtype: str) -> np.ndarray:
    """A [2, L, H, T, D] tensor as the numpy array codecs take (bf16 as uint16 bits)."""
    import torch

    from kvzip.model import TORCH_DTYPES

    kv = kv.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return kv.view(torch.int16).numpy().view(np.uint16)
    return kv.numpy()


def storage_to_kv(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of :func:`kv_to_storage` (float32 arrays from lossy codecs are cast)."""
    import torch

    from kvzip.model import TORCH_DTYPES

    if dtype == "bfloat16" and array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array)).to(TORCH_DTYPES[dtype])


# ---------------------------------------------------------------------- decode
class CacheFile:
    """A ``.kvz`` opened for decoding: the container's checked bytes, decoded by its
    levels' codecs.  Payloads are read lazily, one range each; any byte source works."""

    def __init__(self, reader: KvzReader):
        self.reader = reader
        self.header: KvzHeader = reader.header
        self.entries = reader.entries
        self.codecs = LevelCodecs(reader.header)

    @property
    def version(self) -> tuple[int, int]:
        return self.reader.version

    @property
    def source(self) -> ByteSource:
        return self.reader.source

    @property
    def preamble(self):  # noqa: ANN201 - the container's Preamble
        return self.reader.preamble

    def kv_entries(self, level_name: str) -> list[IndexEntry]:
        return self.reader.kv_entries(level_name)

    def token_ids(self) -> np.ndarray:
        return self.reader.token_ids()

    def chunk_texts(self) -> list[str] | None:
        return self.reader.chunk_texts()

    def read_payload(self, entry: IndexEntry) -> bytes:
        return self.reader.read_payload(entry)

    def file_size(self) -> int:
        return self.reader.source.size()

    def default_level(self) -> str:
        """The file's best level: the one with the most payload bytes."""
        names = self.header.level_names
        sizes = [sum(e.length for e in self.kv_entries(name)) for name in names]
        return names[sizes.index(max(sizes))]

    def level_name(self, level: str | None) -> str:
        """``level`` if the file has it (else UnknownLevelError), or the default."""
        if level is None:
            return self.default_level()
        if level not in self.header.level_names:
            raise UnknownLevelError(
                f"this file has no level {level!r} (it has: {', '.join(self.header.level_names)})")
        return level

    def decode_chunk(self, entry: IndexEntry) -> np.ndarray:
        """One KV chunk of a dense file as ``[2, layers, kv_heads, tokens, head_dim]`` in the
        storage dtype."""
        if entry.kind is not EntryKind.KV:
            raise ValueError(f"not a KV entry: {entry}")
        return self.codecs.decode(entry, self.read_payload(entry))

    def decode_chunk_layers(self, entry: IndexEntry) -> list[np.ndarray]:
        """One KV chunk of any file as each layer's ``[2, kv_heads, n, head_dim]``."""
        if entry.kind is not EntryKind.KV:
            raise ValueError(f"not a KV entry: {entry}")
        return self.codecs.decode_layers(entry, self.read_payload(entry))

    def decode_chunk_into(self, entry: IndexEntry, out: np.ndarray) -> None:
        """:meth:`decode_chunk` straight into ``out`` (e.g. the chunk's slice of a level)."""
        self.codecs.decode_into(entry, self.read_payload(entry), out)

    def class_bits(self, level_name: str) -> list[dict[str, Any]] | None:
        """For a level coded by importance class (``--importance``): per class, its step
        factor, the K and V elements it holds and the bits per element the entropy coder's
        models give its symbols (the payload but for side info and framing); None for a
        level without classes or whose coder cannot price symbols."""
        factors = self.header.levels[self.header.level_names.index(level_name)].codec.get("importance_factors")
        if not factors:
            return None
        entries = self.kv_entries(level_name)
        if not entries:
            return None
        elements, bits = np.zeros(len(factors), np.int64), np.zeros(len(factors))
        for entry in entries:
            got = self.codecs.class_bits(entry, self.read_payload(entry))
            if got is None:
                return None
            elements, bits = elements + got[0], bits + got[1]
        total = max(int(elements.sum()), 1)
        return [{"class": c, "step_factor": float(f), "elements": int(n), "share": round(int(n) / total, 4),
                 "bits_per_element": round(float(b) / int(n), 4) if n else None}
                for c, (f, n, b) in enumerate(zip(factors, elements, bits))]

    def level_elements(self) -> int:
        """K and V elements of one decoded level, as the header declares it."""
        h = self.header
        if h.is_dense:
            return 2 * h.num_layers * h.kv_heads * h.token_count * h.head_dim
        return 2 * h.kv_heads * h.head_dim * sum(h.layout.layer_width(i) for i in range(h.num_layers))

    def level_bytes(self) -> int:
        """The size of one decoded level in the storage dtype, as the header declares it."""
        return self.level_elements() * STORAGE_DTYPES[self.header.dtype].itemsize

    def check_level_memory(self, level_name: str, threads: int = 1) -> None:
        """Refuse a level whose array plus ``threads`` chunks in flight exceed the memory limit."""
        entries = self.kv_entries(level_name)
        h = self.header
        work = chunk_work_bytes(max((self.codecs.chunk_elements(e) for e in entries), default=0))
        check_memory(self.level_bytes() + min(threads, len(entries)) * work,
                     f"decoding level {level_name!r} ({h.token_count} tokens)")

    def decode_level(self, level_name: str, *, decoders: int | None = None) -> np.ndarray:
        """A whole level of a dense file as ``[2, layers, kv_heads, token_count, head_dim]``
        (:meth:`decode_layers` decodes any file)."""
        if not self.header.is_dense:
            raise ValueError("a file with a position layout decodes per layer (decode_layers)")
        return self.decode_layers(level_name, decoders=decoders).dense

    def decode_layers(self, level_name: str, *, decoders: int | None = None) -> LayeredKV:
        """A whole level as its layers (storage dtype; dense files as views of one array),
        its chunks decoded side by side on ``decoders`` threads when the codec releases
        the GIL (default: ``KVZIP_DECODE_WORKERS`` or the CPU count, one for small levels).
        The result is the same either way, bit for bit."""
        entries, codecs, n = self._plan(level_name, decoders)
        out = self.codecs.level_layers()
        decode = self._into_dense(entries, out) if out.is_dense else self._into_layers(entries, out)
        run_on_threads(len(entries), n, decode)
        return out

    def _plan(self, level_name: str, decoders: int | None) -> tuple[list[IndexEntry], list[Codec], int]:
        """A whole level's chunks, its codec and the threads to decode it on, the memory
        limit checked for the level and that many chunks in flight."""
        entries = self.kv_entries(level_name)
        codecs = [self.codecs.codec(entries[0].level)] if entries else []
        n = threads_for(codecs, self.level_elements(), len(entries), decoders)
        self.check_level_memory(level_name, n)
        return entries, codecs, n

    def _into_dense(self, entries: list[IndexEntry], out: LayeredKV) -> Callable[[int], None]:
        """Decode chunk ``i`` straight into its slice of the level's one array."""
        def decode(i: int) -> None:
            start, end = entries[i].token_range
            self.decode_chunk_into(entries[i], out.dense[:, :, :, start:end])

        return decode

    def _into_layers(self, entries: list[IndexEntry], out: LayeredKV) -> Callable[[int], None]:
        """Decode chunk ``i`` and place each layer's part at the slots its positions take."""
        def put(layer: int, heads: slice | int, slots: slice, part: np.ndarray) -> None:
            out.layers[layer][:, heads, slots] = part

        return self._placer(entries, put)

    def _placer(self, entries: list[IndexEntry],
                put: Callable[[int, slice | int, slice, np.ndarray], None]) -> Callable[[int], None]:
        """Decode chunk ``i`` and hand each layer's part to ``put(layer, heads, slots, part)``
        with the slots its positions take in the layer (``part``: ``[2, heads, n, D]``, or
        ``[2, n, D]`` for one head of a layer whose heads hold different positions)."""
        layout = self.header.layout

        def decode(i: int) -> None:
            start, end = entries[i].token_range
            for layer, part in enumerate(self.decode_chunk_layers(entries[i])):
                if not part.shape[2]:
                    continue
                if layout.heads_share(layer):
                    at = layout.slot(layer, 0, start)
                    put(layer, slice(None), slice(at, at + part.shape[2]), part)
                    continue
                for h in range(layout.kv_heads):  # ragged heads: each at its own slots
                    lo, hi = layout.slot(layer, h, start), layout.slot(layer, h, end)
                    put(layer, h, slice(lo, hi), part[:, h, : hi - lo])

        return decode

    def decode_into_cache(self, level_name: str, km: KVModel, *, room: int = 0, decoders: int | None = None) -> Any:
        """A whole level written chunk by chunk straight into a cache for ``km`` (on its
        device, in its dtype; :meth:`KVModel.empty_cache`): attaching holds the cache once,
        plus the chunks being decoded, never a second copy of the whole level."""
        from kvzip.levels.device_decode import decode_chunk_on_device, decode_parts_on_device

        entries, codecs, n = self._plan(level_name, decoders)
        cache = km.empty_cache(self.header.layout, room)
        dtype = self.header.dtype
        if on_device(km, self.header, codecs):
            # an accelerator: the basis and RoPE run there, the chunk crosses once
            def decode(i: int) -> None:
                if not self.header.is_dense:  # block by block (windows, kept entries)
                    for layer, heads, slots, kv in decode_parts_on_device(self, entries[i], km.device):
                        km.fill_cache(cache, layer, heads, slots, kv)
                    return
                start, end = entries[i].token_range
                kv = decode_chunk_on_device(self, entries[i], km.device)
                for layer in range(kv.shape[1]):
                    km.fill_cache(cache, layer, slice(None), slice(start, end), kv[:, layer])

            run_on_threads(len(entries), n, decode)
            return cache

        def put(layer: int, heads: slice | int, slots: slice, part: np.ndarray) -> None:
            km.fill_cache(cache, layer, heads, slots, storage_to_kv(part, dtype))

        run_on_threads(len(entries), n, self._placer(entries, put))
        return cache

    def verify(self, decode: bool = False) -> list[Problem]:
        """Check every payload's checksum (and, with ``decode``, that it decodes);
        every defect is reported, not only the first, for ``kvzip verify``."""
        return self.reader.verify(self.decode_chunk_layers if decode else None)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> CacheFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_cache(path: str | os.PathLike[str] | ByteSource) -> CacheFile:
    """Open a ``.kvz`` (a path, or any byte source) for decoding; it owns a path's file
    until closed (a byte source stays its caller's)."""
    if isinstance(path, (str, os.PathLike)):
        return CacheFile(open_kvz(path))
    return CacheFile(KvzReader(path))


@dataclass
class LoadedKV:
    header: KvzHeader
    token_ids: list[int]
    kv: LayeredKV  # torch tensors in the stored dtype (dense files: one [2, L, H, T, D])
    level: str


def load_kv(
    path: str | os.PathLike[str], level: str | None = None, progress: Progress = no_progress,
    *, decoders: int | None = None,
) -> LoadedKV:
    """Decode one level (default: the file's best) of a ``.kvz`` into a tensor, with its
    header and token ids (``decoders``: see :meth:`CacheFile.decode_level`)."""
    with open_cache(path) as cache:
        name = cache.level_name(level)
        dtype = cache.header.dtype
        kv = cache.decode_layers(name, decoders=decoders).map(lambda a: storage_to_kv(a, dtype))
        return LoadedKV(cache.header, cache.token_ids().tolist(), kv, name)


def on_device(km: KVModel, header: KvzHeader, codecs: Sequence[Codec]) -> bool:
    """Whether attaching decodes the last stages on the model's device: an accelerator and
    a codec with a device form (:mod:`kvzip.levels.device_decode`); any file, dense or
    block by block.  On the CPU numpy is faster (89 against 59 M elements/s,
    ``benchmarks/decode_device.py``)."""
    from kvzip.levels.device_decode import supports as supports_device

    return is_accelerator(km.device) and bool(codecs) and all(supports_device(c) for c in codecs)


@dataclass
class AttachedKV:
    header: KvzHeader
    token_ids: list[int]
    cache: Any  # the model's cache (a transformers DynamicCache) on its device
    level: str


def attach_kv(
    path: str | os.PathLike[str], km: KVModel, level: str | None = None, *, room: int = 0,
    decoders: int | None = None,
) -> AttachedKV:
    """Decode one level (default: the file's best) of a ``.kvz`` straight into a cache for
    ``km``, ready for :meth:`KVModel.generate` (``cache=``), with ``room`` positions
    reserved for what follows (prompt and new tokens): the file is checked to be ``km``'s
    before anything is allocated."""
    with open_cache(path) as cache:
        km.check_stored_cache(cache.header)
        name = cache.level_name(level)
        built = cache.decode_into_cache(name, km, room=room, decoders=decoders)
        return AttachedKV(cache.header, cache.token_ids().tolist(), built, name)


# ---------------------------------------------------------------------- encode
@dataclass
class EncodeSummary:
    path: str
    model: str
    tokens: int
    chunks: int
    levels: list[str]
    dtype: str
    raw_bytes: int  # the captured cache in its dtype
    file_bytes: int
    prefill_seconds: float
    encode_seconds: float
    profile: str | None = None  # digest of the calibration profile the lossy levels use
    importance: str | None = None  # the scorer whose classes weighed the lossy levels' steps

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.file_bytes if self.file_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


@dataclass
class CacheStream:
    """A cache handed over while it is produced (:meth:`KVModel.prefill_chunks`): the
    positions the whole context's cache holds, and batches of ``(start, count, layers)``
    chunks, ``layers[i]`` the ``[2, kv_heads, n, head_dim]`` of layer ``i`` there, in
    chunk order.  :func:`write_kvz` codes each batch as it arrives and keeps none."""

    layout: PositionLayout
    head_dim: int
    batches: Iterable[list[tuple[int, int, list[Any]]]]


def stream_prefill(km: KVModel, ids: Sequence[int], chunk_tokens: int, progress: Progress = no_progress,
                   *, offload: str | os.PathLike[str] | None = None) -> CacheStream:
    """``ids`` prefilled by ``km`` as a :class:`CacheStream` of ``chunk_tokens``-token chunks
    (``offload``: a directory for the model's cache while it reads, see
    :meth:`KVModel.prefill_chunks`)."""
    layout = PositionLayout.from_counts(km.kept_positions(len(ids)), km.kv_heads, len(ids))
    batches = km.prefill_chunks(ids, chunk_tokens, progress=lambda d, t: progress("prefill", d, t),
                                offload=offload)
    return CacheStream(layout, km.head_dim, batches)


def write_kvz(
    kv: torch.Tensor | LayeredKV | CacheStream,
    token_ids: Sequence[int],
    out: str | os.PathLike[str],
    km: KVModel,
    *,
    levels: Sequence[str | tuple[str, Codec]],
    chunk_tokens: int,
    dtype: str,
    chat: ChatInfo | None = None,
    source: SourceInfo | None = None,
    extra_header: dict[str, Any] | None = None,
    chunk_texts: bool = True,
    profile: Profile | None = None,
    progress: Progress = no_progress,
    encoders: int | None = None,
    importance: Sequence[np.ndarray] | None = None,
) -> EncodeSummary:
    """Encode a cache (a :class:`LayeredKV`, one [2, L, H, T, D] tensor, or a
    :class:`CacheStream` coded chunk by chunk as it is produced) into a ``.kvz`` at ``out``.  A cache whose every layer holds every position
    and whose layers share one RoPE table is a 1.0 file; any other is a 2.0 file that
    records its position layout and RoPE tables.

    ``levels`` are level names, or (name, codec) pairs for codecs that no named
    level stands for (``kvzip bench`` stores reference codecs that way).
    ``chunk_texts`` stores each chunk's text too, so a streaming client that
    cannot fetch a chunk in time can recompute it from its text.
    ``profile`` (a model's calibration profile) turns named levels into their
    calibrated codecs; the header then names it, with its size.
    ``encoders``: how many threads code chunks side by side (default by size); the
    file's bytes do not depend on it.  ``importance``: each layer's ``[heads, n]``
    importance classes (``kvzip.importance.classes``), for codecs built with
    ``importance_factors``.
    """
    started = time.perf_counter()
    if profile is not None:
        profile.check_model(km.identity()["fingerprint"])
    named = [(x, codec_for_level(x, profile)) if isinstance(x, str) else x for x in levels]
    if isinstance(kv, CacheStream):
        array, layout, head_dim = None, kv.layout, kv.head_dim
        if importance is not None:
            raise ValueError("importance classes need the whole cache; pass a LayeredKV")
    else:
        if not isinstance(kv, LayeredKV):
            kv = LayeredKV.from_dense(kv)
        array = kv.map(lambda t: kv_to_storage(t, dtype))
        layout, head_dim = array.layout, array.head_dim
    n_layers, kv_heads, n_tokens = layout.num_layers, layout.kv_heads, layout.token_count
    tables, layer_rope = km.rope_tables()
    header = new_header(
        kvzip_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=km.identity(),
        num_layers=n_layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        token_count=n_tokens, chunk_tokens=chunk_tokens,
        levels=[(name, codec.config()) for name, codec in named],
        rope_tables=tables, layer_rope=layer_rope, layout=layout,
        attention=km.attention_info(),
        profile=None if profile is None else ProfileInfo(profile.digest, profile.size),
        chat=chat, source=source, extra=extra_header,
    )
    ranges = chunk_ranges(n_tokens, chunk_tokens)
    out = Path(out)
    codecs = [codec for _, codec in named]
    waited = 0.0  # seconds a stream's producer (the model) took
    with KvzWriter(out, header.raw) as writer:
        writer.set_token_ids(np.asarray(token_ids, dtype=np.int64))

        def add(first: int, payloads: list[list[bytes]]) -> None:
            for chunk, levels_out in enumerate(payloads, first):
                start, count = ranges[chunk]
                for level, payload in enumerate(levels_out):
                    writer.add_kv(chunk, level, start, count, payload)
                if chunk_texts and km.tokenizer is not None:
                    writer.add_text(chunk, start, count, km.tokenizer.decode(list(token_ids[start : start + count])))

        if array is not None:
            add(0, encode_chunks(array, codecs, ranges, header, encoders,
                                 done=lambda n: progress("encode", n, len(ranges)), importance=importance))
        else:
            waited = _write_stream(kv, header, codecs, ranges, dtype, encoders, add, progress)
        writer.commit()
    return EncodeSummary(
        path=str(out), model=km.name, tokens=n_tokens, chunks=len(ranges),
        levels=[name for name, _ in named], dtype=dtype,
        raw_bytes=2 * layout.stored() * head_dim * STORAGE_DTYPES[dtype].itemsize,
        file_bytes=out.stat().st_size, prefill_seconds=waited,
        encode_seconds=time.perf_counter() - started - waited,
        profile=None if profile is None else profile.digest,
    )


def _write_stream(stream: CacheStream, header: KvzHeader, codecs: Sequence[Codec], ranges: Sequence[tuple[int, int]],
                  dtype: str, encoders: int | None, add: Callable[[int, list[list[bytes]]], None],
                  progress: Progress) -> float:
    """Code a :class:`CacheStream`'s chunks as they arrive, handing their payloads to ``add``
    in order; the seconds spent waiting for the stream.  Chunks wait, in the storage dtype,
    until they fill a small share of the memory limit (:data:`STREAM_PENDING_FRACTION`) or
    the stream ends, then are coded side by side on threads: a small cache is coded in one
    run, as the whole-cache path codes it, and a large one a few chunks at a time.  The
    bytes are those :func:`encode_chunks` writes for the same cache."""
    layout, waited, next_chunk = header.layout, 0.0, 0
    ctx = dense_context(header) if header.is_dense else None
    pending: list[tuple[tuple[int, int], Any]] = []
    limit = int(memory_limit() * STREAM_PENDING_FRACTION)

    def flush() -> None:
        nonlocal next_chunk
        spans = [span for span, _ in pending]
        pieces = [piece for _, piece in pending]
        pending.clear()
        if ctx is not None:
            def encode(j: int) -> list[bytes]:
                return encode_dense_chunk(pieces[j], codecs, ctx, *spans[j], offset=spans[j][0])

            elements = [p.size for p in pieces]
        else:
            def encode(j: int) -> list[bytes]:
                return encode_layered_chunk(pieces[j], codecs, header, *spans[j])

            elements = [p.elements() for p in pieces]
        n = threads_for(codecs, sum(elements), len(pieces), encoders)
        n = n if encoders is not None else stream_threads(max(elements), n)
        add(next_chunk, code_chunks(encode, codecs, sum(elements), len(pieces), n, None))
        next_chunk += len(spans)
        release_free_memory()
        progress("encode", next_chunk, len(ranges))

    batches = iter(stream.batches)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t0
        if batch is None:
            break
        spans = [(start, count) for start, count, _ in batch]
        done = next_chunk + len(pending)
        if list(ranges[done : done + len(batch)]) != spans:
            raise ValueError(f"the stream's chunks {spans} are not the file's next chunks")
        for j, (start, count) in enumerate(spans):  # each chunk in the storage dtype, its parts let go
            layers = [kv_to_storage(part, dtype) for part in batch[j][2]]
            batch[j] = None
            if ctx is not None:
                pending.append(((start, count), np.stack(layers, axis=1)))  # [2, L, H, count, D]
            else:
                pending.append(((start, count), LayeredKV(layers, chunk_layout(layout, start, start + count))))
            del layers
        del batch
        if sum(_nbytes(piece) for _, piece in pending) >= limit:
            flush()
    if pending:
        flush()
    if next_chunk != len(ranges):
        raise ValueError(f"the stream ended after {next_chunk} of {len(ranges)} chunks")
    return waited


# A streamed encode lets chunks wait to be coded together up to this share of the memory
# limit: a whole small cache (the default model's 8K context is 377 MiB in fp32, its 2K one
# 94 MiB), a few chunks of a large one.
STREAM_PENDING_FRACTION = 1 / 64


def _nbytes(piece: Any) -> int:
    if isinstance(piece, LayeredKV):
        return sum(layer.nbytes for layer in piece.layers)
    return int(piece.nbytes)


def chunk_layout(layout: PositionLayout, start: int, end: int) -> PositionLayout:
    """The positions ``layout`` holds inside ``[start, end)``, per (layer, head)."""
    return PositionLayout([[layout.in_range(layer, h, start, end) for h in range(layout.kv_heads)]
                           for layer in range(layout.num_layers)], layout.token_count)
