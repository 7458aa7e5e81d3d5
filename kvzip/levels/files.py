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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    Problem,
    ProfileInfo,
    SourceInfo,
    new_header,
    open_kvz,
)
from kvzip.formats.limits import check_memory, chunk_work_bytes
from kvzip.formats.spec import EntryKind
from kvzip.levels.chunks import LevelCodecs, chunk_ranges, encode_chunks
from kvzip.levels.executor import run_on_threads, threads_for
from kvzip.levels.progress import Progress, no_progress
from kvzip.levels.table import codec_for_level
from kvzip.model import TORCH_DTYPES, KVModel

DEFAULT_CHUNK_TOKENS = 256


def kv_to_storage(kv: torch.Tensor, dtype: str) -> np.ndarray:
    """A [2, L, H, T, D] tensor as the numpy array codecs take (bf16 as uint16 bits)."""
    kv = kv.detach().to(TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return kv.view(torch.int16).numpy().view(np.uint16)
    return kv.numpy()


def storage_to_kv(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of :func:`kv_to_storage` (float32 arrays from lossy codecs are cast)."""
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
        entries = self.kv_entries(level_name)
        codecs = [self.codecs.codec(entries[0].level)] if entries else []
        out = self.codecs.level_layers()
        n = threads_for(codecs, out.elements(), len(entries), decoders)
        self.check_level_memory(level_name, n)
        decode = self._into_dense(entries, out) if out.is_dense else self._into_layers(entries, out)
        run_on_threads(len(entries), n, decode)
        return out

    def _into_dense(self, entries: list[IndexEntry], out: LayeredKV) -> Callable[[int], None]:
        """Decode chunk ``i`` straight into its slice of the level's one array."""
        def decode(i: int) -> None:
            start, end = entries[i].token_range
            self.decode_chunk_into(entries[i], out.dense[:, :, :, start:end])

        return decode

    def _into_layers(self, entries: list[IndexEntry], out: LayeredKV) -> Callable[[int], None]:
        """Decode chunk ``i`` and place each layer's part at the slots its positions take."""
        layout = out.layout

        def decode(i: int) -> None:
            start, end = entries[i].token_range
            for layer, part in enumerate(self.decode_chunk_layers(entries[i])):
                if not part.shape[2]:
                    continue
                if layout.heads_share(layer):
                    at = int(np.searchsorted(layout.positions[layer][0], start))
                    out.layers[layer][:, :, at : at + part.shape[2]] = part
                    continue
                for h in range(layout.kv_heads):  # ragged heads: each at its own slots
                    p = layout.positions[layer][h]
                    lo, hi = np.searchsorted(p, [start, end])
                    out.layers[layer][:, h, lo:hi] = part[:, h, : hi - lo]

        return decode

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

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.file_bytes if self.file_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


def write_kvz(
    kv: torch.Tensor | LayeredKV,
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
    """Encode an already captured cache (a :class:`LayeredKV`, or one [2, L, H, T, D]
    tensor) into a ``.kvz`` at ``out``.  A cache whose every layer holds every position
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
    if not isinstance(kv, LayeredKV):
        kv = LayeredKV.from_dense(kv)
    array = kv.map(lambda t: kv_to_storage(t, dtype))
    n_layers, kv_heads, n_tokens, head_dim = array.num_layers, array.kv_heads, array.token_count, array.head_dim
    tables, layer_rope = km.rope_tables()
    header = new_header(
        kvzip_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=km.identity(),
        num_layers=n_layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        token_count=n_tokens, chunk_tokens=chunk_tokens,
        levels=[(name, codec.config()) for name, codec in named],
        rope_tables=tables, layer_rope=layer_rope, layout=array.layout,
        attention=km.attention_info(),
        profile=None if profile is None else ProfileInfo(profile.digest, profile.size),
        chat=chat, source=source, extra=extra_header,
    )
    ranges = chunk_ranges(n_tokens, chunk_tokens)
    out = Path(out)
    with KvzWriter(out, header.raw) as writer:
        writer.set_token_ids(np.asarray(token_ids, dtype=np.int64))
        payloads = encode_chunks(array, [codec for _, codec in named], ranges, header, encoders,
                                 done=lambda n: progress("encode", n, len(ranges)), importance=importance)
        for chunk, ((start, count), levels_out) in enumerate(zip(ranges, payloads)):
            for level, payload in enumerate(levels_out):
                writer.add_kv(chunk, level, start, count, payload)
            if chunk_texts and km.tokenizer is not None:
                writer.add_text(chunk, start, count, km.tokenizer.decode(list(token_ids[start : start + count])))
        del payloads
        writer.commit()
    return EncodeSummary(
        path=str(out), model=km.name, tokens=n_tokens, chunks=len(ranges),
        levels=[name for name, _ in named], dtype=dtype,
        raw_bytes=array.elements() * STORAGE_DTYPES[dtype].itemsize,
        file_bytes=out.stat().st_size, prefill_seconds=0.0,
        encode_seconds=time.perf_counter() - started,
        profile=None if profile is None else profile.digest,
    )
