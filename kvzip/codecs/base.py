"""The codec contract shared by every KV codec.

A codec turns one *chunk* of KV cache (every layer's keys and values for a
contiguous token range) into bytes that decode on their own, and back.  A codec
is identified by ``codec_id`` and fully described by a JSON config
(:meth:`Codec.config`); the container stores that config, so a file says how
to decode itself and :func:`kvzip.codecs.registry.codec_from_config` rebuilds
the codec from it.

Array layout (the same everywhere in kvzip below the model layer)::

    kv: numpy array [2, layers, kv_heads, tokens, head_dim]
        kv[0] are keys (after RoPE, as the model's cache holds them), kv[1] values.

Storage dtypes: ``float32`` and ``float16`` arrays are their numpy dtypes;
``bfloat16`` (which numpy lacks) travels as ``uint16`` bit patterns.  A lossless
codec returns exactly the array it was given; a lossy codec may return float32,
and the caller casts to the storage dtype.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvzip.errors import CodecError

STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bit patterns
}


@dataclass(frozen=True)
class ChunkContext:
    """What a codec knows about the chunk besides its numbers."""

    token_start: int  # absolute position of the chunk's first token
    token_count: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # storage dtype name, a key of STORAGE_DTYPES
    # RoPE inverse frequencies (head_dim // 2 floats) for transforms that
    # un-rotate keys to pre-RoPE; None when the model has no rotary embedding.
    rope_inv_freq: tuple[float, ...] | None = None
    # A block of a chunk (a 2.x file's position layout, kvzip.formats.layout): which of
    # the model's layers and kv heads the array's rows are, and the positions of its
    # tokens (sorted; None: token_start .. token_start + token_count - 1).  None: all.
    layer_ids: tuple[int, ...] | None = None
    head_ids: tuple[int, ...] | None = None
    positions: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Encoding only: each (layer, head, token)'s importance class [L, H, T] uint8, for a
    # codec built with importance factors (kvzip.importance); it travels in the payload.
    importance: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.num_layers, self.kv_heads, self.token_count, self.head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers of the array's layer axis, in order."""
        return tuple(range(self.num_layers)) if self.layer_ids is None else self.layer_ids

    @property
    def heads(self) -> tuple[int, ...]:
        """The model kv heads of the array's head axis, in order."""
        return tuple(range(self.kv_heads)) if self.head_ids is None else self.head_ids

    def position_array(self) -> np.ndarray:
        """Each token's position in the context (int64, sorted)."""
        if self.positions is None:
            return np.arange(self.token_start, self.token_start + self.token_count, dtype=np.int64)
        return self.positions

    def count_below(self, position: int) -> int:
        """How many of the chunk's tokens sit before ``position`` (they come first)."""
        if self.positions is None:
            return max(0, min(self.token_count, position - self.token_start))
        return int(np.searchsorted(self.positions, position))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(kv: np.ndarray, dtype: str) -> np.ndarray:
    """A storage-dtype array as float32 values."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(kv)
    return kv.astype(np.float32, copy=False)


def from_float32(kv: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 values to a storage dtype (bfloat16 rounds to nearest even)."""
    target = STORAGE_DTYPES[dtype]
    if kv.dtype == target:
        return kv
    if dtype != "bfloat16":
        return kv.astype(target)
    # float32 -> bfloat16 bit patterns, rounding to nearest even; NaNs stay (quiet) NaNs.
    bits = np.ascontiguousarray(kv, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(kv)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread while any caller, on any thread, is inside.

    The limit is process-wide state, so it is set by the first caller in and
    restored by the last one out: two decode threads nesting the same limit with
    threadpoolctl directly could restore it in the wrong order and leave BLAS at
    one thread for good.  A thread pool must be started by a thread that is
    already inside: OpenBLAS (0.3.31, pthreads) ignores a limit first set from a
    worker thread once another thread has set and restored one (measured: the
    worker's products then still ran on two threads)."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


class Codec(ABC):
    """An id, a JSON config, and encode/decode of one chunk."""

    codec_id: ClassVar[str]
    lossless: ClassVar[bool] = False
    # Whether the codec is built with a calibration profile object (its config names it by
    # digest; kvzip.levels finds it and codec_from_config hands it over).
    needs_profile: ClassVar[bool] = False
    # Whether decode spends its time outside the GIL (C code, numpy, BLAS), so that
    # threads can decode chunks in parallel (kvzip.levels.executor); else chunks run one by one.
    releases_gil: bool = False

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The codec's parameters (JSON-serialisable), without the id."""

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Codec:
        try:
            return cls(**params)
        except TypeError as exc:
            raise CodecError(f"bad config for codec {cls.codec_id!r}: {exc}") from None

    def config(self) -> dict[str, Any]:
        cfg = {"id": self.codec_id, **self.params()}
        json.dumps(cfg)  # fail early if a parameter is not JSON
        return cfg

    @abstractmethod
    def encode(self, kv: np.ndarray, ctx: ChunkContext) -> bytes:
        """Encode ``kv`` (shape ``ctx.shape``) into a self-contained payload."""

    @abstractmethod
    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        """Decode a payload back to an array of shape ``ctx.shape``."""

    def decode_into(self, payload: bytes, ctx: ChunkContext, out: np.ndarray) -> None:
        """Decode into ``out`` (float32, ``ctx.shape``, possibly a strided slice of a
        larger array); codecs override it to skip the intermediate array."""
        out[...] = self.decode(payload, ctx)

    def codes_heads_apart(self) -> bool:
        """Whether the codec can code some of a layer's kv heads without the others (a
        layer whose heads hold different positions is coded head by head)."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"
