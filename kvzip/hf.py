"""kvzip for Hugging Face users: a ``DynamicCache`` to a ``.kvz`` and back, and chunk reads.

    cache = model(input_ids, use_cache=True).cache
    kvzip.save(cache, "doc.kvz", model=model, input_ids=input_ids, tokenizer=tokenizer)
    cache = kvzip.load("doc.kvz", model=model, tokenizer=tokenizer)   # a DynamicCache

``model`` is a plain ``transformers`` causal LM of a supported family; ``tokenizer`` is
optional.  With it, the file's model identity is the one ``kvzip encode`` writes for the
same model, so the CLI and this face read each other's files, and the file stores each
chunk's text; without it, the identity records no tokenizer, and checks between this face
and any file compare the config and the weights only (see :mod:`kvzip.model.plain`).
A file written for another model is refused with :class:`~kvzip.errors.ModelMismatchError`,
before anything of it is decoded.

Everything here goes through kvzip's own encode and decode path (``resolve``,
``write_kvz`` and ``open_cache`` of :mod:`kvzip.levels`); this module only converts
between a cache object and them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvzip.codecs import STORAGE_DTYPES
from kvzip.errors import InputError
from kvzip.formats import ByteSource, IndexEntry, KvzHeader, PositionLayout
from kvzip.levels import (
    DEFAULT_CHUNK_TOKENS,
    CacheFile,
    EncodeSummary,
    check_if_missing,
    check_levels,
    is_calibrated,
    open_cache,
    resolve,
    storage_to_kv,
    write_kvz,
)
from kvzip.model import KVModel
from kvzip.model.plain import as_kv_model
from kvzip.model.pruned import pruned_attention

__all__ = ["Chunk", "KvzFile", "load", "open", "pruned_attention", "save"]

# The library face defaults to a bit-exact round trip (what save/load means elsewhere in
# Python), and a lossy level never starts a calibration unasked: see save().
DEFAULT_LEVEL = "lossless"
IF_NO_PROFILE = "uncalibrated"


def save(
    cache: Any,
    path: str | os.PathLike[str],
    *,
    model: Any,
    input_ids: Any,
    tokenizer: Any = None,
    level: str | Sequence[str] = DEFAULT_LEVEL,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dtype: str | None = None,
    profile: str | os.PathLike[str] | None = None,
    if_no_profile: str = IF_NO_PROFILE,
) -> EncodeSummary:
    """Store ``cache`` (a ``DynamicCache`` of one sequence) as a ``.kvz`` at ``path``.

    ``input_ids``: the token ids the cache was computed from (a list, a 1-D tensor or a
    ``[1, T]`` tensor), exactly as many as the cache holds; they are stored so the
    context can be continued, and decoded into each chunk's text when a ``tokenizer``
    is given.  ``level``: ``"lossless"`` (default, bit-exact), ``"high"``,
    ``"balanced"``, ``"small"``, or several of them stored side by side.  The lossy
    levels use the model's calibration profile (``profile``: a ``.kvzprofile`` file or
    digest; by default the newest one for the model, found by its fingerprint, so made
    with the same tokenizer); when the model has none, ``if_no_profile`` decides:
    ``"uncalibrated"`` (default: the uncalibrated codec, no waiting), ``"calibrate"``
    (build one first: minutes on a real model, needs ``tokenizer``) or ``"error"``.
    ``dtype``: store as ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default: the
    cache's own dtype).  Returns what was written (sizes, levels, the profile used).
    """
    names = check_levels([level] if isinstance(level, str) else level)
    check_if_missing(if_no_profile)
    if chunk_tokens <= 0:
        raise InputError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    km = as_kv_model(model, tokenizer)
    if km.tokenizer is None and if_no_profile == "calibrate" and any(map(is_calibrated, names)):
        raise InputError("if_no_profile='calibrate' needs tokenizer= (calibration reads texts)")
    ids = _token_ids(input_ids, km)
    n_tokens = _cache_length(cache)
    if len(ids) != n_tokens:
        raise InputError(
            f"the cache holds {n_tokens} tokens but input_ids has {len(ids)}; pass the ids the "
            "cache was computed from (after generate(), the last token is not cached yet)"
        )
    km.check_length(n_tokens, "the cache")
    kv = km.capture(cache, n_tokens).map(lambda t: t.detach().cpu())
    stored = dtype or str(kv.layers[0].dtype).removeprefix("torch.")
    if stored not in STORAGE_DTYPES:
        raise InputError(f"the cache is {stored}; pass dtype= one of {', '.join(STORAGE_DTYPES)}")
    levels = resolve(names, km, profile, if_missing=if_no_profile)
    return write_kvz(kv, ids, path, km, levels=levels.pairs(), chunk_tokens=chunk_tokens,
                     dtype=stored, profile=levels.profile)


def load(
    path: str | os.PathLike[str],
    *,
    model: Any,
    tokenizer: Any = None,
    level: str | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """The cache stored in ``path`` as a ``DynamicCache`` for ``model``.

    Refuses a file written for another model (:class:`~kvzip.errors.ModelMismatchError`)
    before decoding it.  ``level``: which stored level (default: the file's best).  The
    layers hold the decoded K/V in the model's dtype on ``device`` (default: the model's),
    ready for ``model.generate(input_ids=ids, cache=cache)`` where ``ids`` starts with the
    stored ids (:attr:`KvzFile.input_ids`) and goes on past them: the model needs at
    least one uncached token.  Each layer's position counter is the stored context's
    length, also in sliding-window layers that hold only their window.  To continue
    right after the stored ids, call ``cache.crop(-1)`` first; that works only while
    no sliding layer's window is full (a full window keeps only what the next new
    token needs).  ``generate`` extends the cache in place, so load a fresh one (or
    ``copy.deepcopy`` it) for each generation.

    A file written with ``--keep`` holds a different set of positions per kv head; its
    cache is a pruned one, which the model must read with kvzip's attention:
    ``with kvzip.pruned_attention(model, cache): model.generate(...)`` (outside that block
    it refuses to run rather than attend to the new tokens alone).
    """
    km = as_kv_model(model, tokenizer)
    with open_cache(path) as file:
        km.check_stored_cache(file.header)
        dtype = file.header.dtype
        kv = file.decode_layers(file.level_name(level)).map(lambda a: storage_to_kv(a, dtype))
    target = device if device is not None else km.device
    return km.build_cache(kv, device=target)


def open(source: str | os.PathLike[str] | ByteSource) -> KvzFile:  # noqa: A001  (kvzip.open)
    """A ``.kvz`` opened for lazy reads: a local path, or any ``kvzip.formats`` byte source.

    Opening reads and checks the header and the chunk index only; token ids, chunk texts
    and each chunk's K/V are read when asked for.  Use it as a context manager, or
    :meth:`KvzFile.close` it.
    """
    return KvzFile(open_cache(source))


@dataclass(frozen=True)
class Chunk:
    """One independently decodable run of tokens: ``token_ids[start:stop]``."""

    index: int
    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


class KvzFile:
    """A ``.kvz`` whose header and index are read; its payloads are read on demand."""

    def __init__(self, file: CacheFile):
        self._file = file

    @property
    def header(self) -> KvzHeader:
        """The validated header (model identity, geometry, levels, chat template...)."""
        return self._file.header

    @property
    def model_fingerprint(self) -> str:
        return self.header.model_fingerprint

    @property
    def tokens(self) -> int:
        return self.header.token_count

    @property
    def num_layers(self) -> int:
        return self.header.num_layers

    @property
    def kv_heads(self) -> int:
        return self.header.kv_heads

    @property
    def head_dim(self) -> int:
        return self.header.head_dim

    @property
    def dtype(self) -> str:
        return self.header.dtype

    @property
    def levels(self) -> tuple[str, ...]:
        return self.header.level_names

    @functools.cached_property
    def default_level(self) -> str:
        """The level :func:`load` and :meth:`decode_chunk` use unless told: the file's best."""
        return self._file.default_level()

    @functools.cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        """The chunks, in token order (from the index: nothing is read)."""
        entries = self._file.kv_entries(self.levels[0])
        return tuple(Chunk(i, e.token_start, e.token_count) for i, e in enumerate(entries))

    @functools.cached_property
    def token_ids(self) -> list[int]:
        """The stored context's token ids (read on first use)."""
        return self._file.token_ids().tolist()

    @property
    def input_ids(self) -> torch.Tensor:
        """:attr:`token_ids` as a ``[1, T]`` int64 tensor, as ``generate`` takes them."""
        return torch.tensor([self.token_ids], dtype=torch.long)

    def chunk_texts(self) -> list[str] | None:
        """Each chunk's text, or None when the file stores none (saved without a tokenizer)."""
        return self._file.chunk_texts()

    def decode_chunk(self, index: int, level: str | None = None) -> torch.Tensor:
        """Chunk ``index`` of ``level`` (default :attr:`default_level`), reading only its
        payload: ``[2, layers, kv_heads, count, head_dim]`` in the stored dtype, ``[0]``
        the keys (after RoPE at their positions in the context), ``[1]`` the values."""
        return storage_to_kv(self._file.decode_chunk(self._entry(index, level)), self.dtype)

    def decode_chunk_layers(self, index: int, level: str | None = None) -> list[torch.Tensor]:
        """Chunk ``index`` as each layer's ``[2, kv_heads, n, head_dim]``: the positions the
        file's layout gives that layer inside the chunk (:attr:`layout`), for any file;
        :meth:`decode_chunk` is the one-tensor form of a file whose layers hold every position."""
        return [storage_to_kv(a, self.dtype) for a in self._file.decode_chunk_layers(self._entry(index, level))]

    def _entry(self, index: int, level: str | None) -> IndexEntry:
        entries = self._file.kv_entries(self._file.level_name(level))
        if not -len(entries) <= index < len(entries):
            raise IndexError(f"chunk {index} out of range: the file has {len(entries)} chunks")
        return entries[index]

    @property
    def layout(self) -> PositionLayout:
        """Which context positions each (layer, kv head) holds."""
        return self.header.layout

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> KvzFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KvzFile(tokens={self.tokens}, levels={list(self.levels)}, chunks={len(self.chunks)}, "
                f"model={self.model_fingerprint[:12]})")


# ---------------------------------------------------------------------- helpers
def _token_ids(input_ids: Any, km: KVModel) -> list[int]:
    """``input_ids`` (a list, ``[[...]]``, a 1-D or ``[1, T]`` tensor or array) as a list of ids."""
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise InputError("input_ids must be a list of ints or a [T] / [1, T] tensor") from None
    if input_ids.ndim == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.ndim != 1:
        raise InputError(f"input_ids must be one sequence (a list, [T] or [1, T]), got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integers, got {input_ids.dtype}")
    ids = input_ids.tolist()
    vocab = int(getattr(km.text_config, "vocab_size", 0) or 2**32)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InputError(f"input_ids holds {bad[0]}, outside the model's vocabulary of {vocab}")
    if not ids:
        raise InputError("input_ids is empty: nothing to store")
    return ids


def _cache_length(cache: Any) -> int:
    """How many tokens a one-sequence cache holds (refusing batches and non-caches)."""
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "get_seq_length"):
        raise InputError(f"cache must be a transformers DynamicCache, got {type(cache).__name__}")
    keys = getattr(layers[0], "keys", None)
    if isinstance(keys, torch.Tensor) and keys.ndim == 4 and keys.shape[0] != 1:
        raise InputError(f"the cache holds a batch of {keys.shape[0]} sequences; kvzip stores one")
    return int(cache.get_seq_length())
