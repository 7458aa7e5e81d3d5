"""The core both ways: a captured cache tensor <-> a ``.kvz`` file.

``kvzip.api``, ``kvzip.stream`` and ``kvzip.store`` all encode and decode
through here, so there is one path from tensors to files.
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
from kvzip.codecs import Codec, codec_for_level
from kvzip.codecs.profile import Profile
from kvzip.errors import UnknownLevelError
from kvzip.formats import (
    ChatInfo,
    KvzHeader,
    KvzReader,
    KvzWriter,
    ProfileInfo,
    SourceInfo,
    new_header,
    open_kvz,
)
from kvzip.formats.parallel import default_decoders, encode_chunks_parallel, on_threads
from kvzip.model import TORCH_DTYPES, KVModel

Progress = Callable[[str, int, int], None]
DEFAULT_CHUNK_TOKENS = 256


def no_progress(stage: str, done: int, total: int) -> None:
    pass


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


# Below this many cache elements (about 3 chunks of 256 tokens of a 135M model)
# encoding stays in-process: starting and feeding workers costs more.
MIN_PARALLEL_ENCODE_ELEMENTS = 8_000_000


def _rebuildable(codecs: Sequence[Codec]) -> bool:
    """Whether a fresh worker process can rebuild every codec from its config: kvzip's
    own codec classes only, which register on import in every process (a caller may
    register its own here, which a worker lacks)."""
    return all(type(c).__module__.startswith("kvzip.codecs.") for c in codecs)


def _encoders(numel: int, n_chunks: int, encoders: int | None, codecs: Sequence[Codec] = ()) -> int:
    """How many encoders (threads or processes, this one included; 1 = this thread only)."""
    if not on_threads(codecs) and not _rebuildable(codecs):
        return 1  # e.g. a benchmark's own codec object, unknown to a fresh process
    if encoders is not None:
        return max(1, min(int(encoders), n_chunks))
    if numel < MIN_PARALLEL_ENCODE_ELEMENTS or n_chunks < 2:
        return 1
    return min(default_decoders(), n_chunks)


def write_kvz(
    kv: torch.Tensor,
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
) -> EncodeSummary:
    """Encode an already captured cache ([2, L, H, T, D]) into a ``.kvz`` at ``out``.

    ``levels`` are level names, or (name, codec) pairs for codecs that no named
    level stands for (``kvzip bench`` stores reference codecs that way).
    ``chunk_texts`` stores each chunk's text too, so a streaming client that
    cannot fetch a chunk in time can recompute it from its text.
    ``profile`` (a model's calibration profile) turns named levels into their
    calibrated codecs; the header then names it, with its size.
    ``encoders``: how many threads (codecs that release the GIL) or processes encode
    chunks (this one included); by default
    all CPUs (``KVZIP_DECODE_WORKERS``) when the cache is large enough to gain.
    The file's bytes do not depend on it.
    """
    started = time.perf_counter()
    digest = None
    if profile is not None:
        profile.check_model(km.identity()["fingerprint"])
        digest = profile.digest
    named = [(x, codec_for_level(x, digest)) if isinstance(x, str) else x for x in levels]
    array = kv_to_storage(kv, dtype)
    _, n_layers, kv_heads, n_tokens, head_dim = array.shape
    inv_freq = km.rope_inv_freq()
    header = new_header(
        kvzip_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=km.identity(),
        num_layers=n_layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        token_count=n_tokens, chunk_tokens=chunk_tokens,
        levels=[(name, codec.config()) for name, codec in named],
        rope_inv_freq=inv_freq,
        profile=None if profile is None else ProfileInfo(profile.digest, profile.size),
        chat=chat, source=source, extra=extra_header,
    )
    codecs = [codec for _, codec in named]
    starts = list(range(0, n_tokens, chunk_tokens))
    ranges = [(start, min(chunk_tokens, n_tokens - start)) for start in starts]
    ctx = {"num_layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
           "rope_inv_freq": None if inv_freq is None else [float(f) for f in inv_freq]}
    out = Path(out)
    with KvzWriter(out, header.raw) as writer:
        writer.set_token_ids(np.asarray(token_ids, dtype=np.int64))
        payloads = encode_chunks_parallel(array, codecs, ranges, ctx, _encoders(array.size, len(ranges), encoders, codecs),
                                          done=lambda n: progress("encode", n, len(starts)))
        for chunk, ((start, count), levels_out) in enumerate(zip(ranges, payloads)):
            for level, payload in enumerate(levels_out):
                writer.add_kv(chunk, level, start, count, payload)
            if chunk_texts and km.tokenizer is not None:
                text = km.tokenizer.decode(list(token_ids[start : start + count]))
                writer.add_text(chunk, start, count, text)
        del payloads
        writer.commit()
    return EncodeSummary(
        path=str(out),
        model=km.name,
        tokens=n_tokens,
        chunks=len(starts),
        levels=[name for name, _ in named],
        dtype=dtype,
        raw_bytes=array.nbytes,
        file_bytes=out.stat().st_size,
        prefill_seconds=0.0,
        encode_seconds=time.perf_counter() - started,
        profile=digest,
    )


# ---------------------------------------------------------------------- decode
def _level_name(reader: KvzReader, level: str | None) -> str:
    """The level asked for, or by default the file's best (largest) one."""
    names = reader.header.level_names
    if level is None:
        sizes = [sum(e.length for e in reader.kv_entries(name)) for name in names]
        return names[sizes.index(max(sizes))]
    if level not in names:
        raise UnknownLevelError(f"this file has no level {level!r} (it has: {', '.join(names)})")
    return level


@dataclass
class LoadedKV:
    header: KvzHeader
    token_ids: list[int]
    kv: torch.Tensor  # [2, L, H, T, D] in the stored dtype
    level: str


def load_kv(
    path: str | os.PathLike[str], level: str | None = None, progress: Progress = no_progress,
    *, decoders: int | None = None,
) -> LoadedKV:
    """Decode one level of a ``.kvz`` into a tensor, with its header and token ids.

    Large levels decode on several processes straight into a shared buffer that
    the returned tensor wraps without a copy (``decoders``: see
    :meth:`KvzReader.decode_level`).
    """
    with open_kvz(path) as reader:
        name = _level_name(reader, level)
        array = reader.decode_level(name, decoders=decoders)
        kv = storage_to_kv(array, reader.header.dtype)
        return LoadedKV(reader.header, reader.token_ids().tolist(), kv, name)
