"""Typed codec stages and the pipeline that chains them.

A lossy kvzip codec is three kinds of stage, in this order::

    ArrayTransform*  (float32 [2, L, H, T, D] -> float32, same shape, invertible)
    Quantizer        (float32 array -> SymbolBlocks: integer symbol matrices + side bytes)
    SymbolCoder      (SymbolBlocks -> bytes)

:class:`StagePipeline` checks that order once, when it is built (as zarr does
for its array->array / array->bytes / bytes->bytes codecs), so the hot loop
never re-checks it.  Codecs (``cachegen``, ``kvzip-lossy``) are thin: they map
their JSON config onto stages and frame the resulting sections into one
self-contained payload with a CRC.
"""

from __future__ import annotations

import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvzip.codecs.base import ChunkContext, Codec, to_float32
from kvzip.errors import CodecError


@dataclass
class SymbolBlocks:
    """What a quantizer hands the entropy coder.

    ``matrices`` are int32 arrays of shape [groups, n]: each row is one group of
    symbols that shares one probability model (e.g. one (layer, channel)).
    ``side`` are the quantizer's own bytes (scales, steps) stored beside them.
    """

    matrices: list[np.ndarray]
    side: bytes = b""
    shapes: list[tuple[int, int]] = field(default_factory=list)


class ArrayTransform(ABC):
    """array -> array, exactly invertible up to float rounding."""

    @abstractmethod
    def forward(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray: ...

    @abstractmethod
    def inverse(self, x: np.ndarray, ctx: ChunkContext) -> np.ndarray: ...


class Quantizer(ABC):
    """array -> integer symbols (+ side info), and back."""

    @abstractmethod
    def symbol_shapes(self, ctx: ChunkContext) -> list[tuple[int, int]]:
        """Shapes of the symbol matrices for a chunk (known to the decoder from ctx)."""

    @abstractmethod
    def quantize(self, x: np.ndarray, ctx: ChunkContext) -> SymbolBlocks: ...

    @abstractmethod
    def dequantize(self, blocks: SymbolBlocks, ctx: ChunkContext) -> np.ndarray: ...

    def element_classes(self, side: bytes, ctx: ChunkContext) -> list[np.ndarray] | None:
        """Each symbol matrix's importance class per element (shaped as the matrices), from
        the quantizer's side info; None when it codes without classes."""
        return None

    def class_count(self) -> int:
        return 0


class SymbolCoder(ABC):
    """symbol matrices -> bytes, and back (lossless)."""

    releases_gil: bool = False  # whether decode runs outside the GIL (see Codec.releases_gil)

    @abstractmethod
    def encode(self, matrix: np.ndarray) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes, shape: tuple[int, int]) -> np.ndarray: ...

    def code_lengths(self, data: bytes, shape: tuple[int, int]) -> np.ndarray | None:
        """Bits per element of the decoded matrix, where the coder can say (else None)."""
        return None


_FRAME_VERSION = 1
_FRAME_HEAD = struct.Struct("<BII")  # version, crc32 of the rest, section count
_LEN = struct.Struct("<I")


def pack_sections(sections: list[bytes]) -> bytes:
    body = b"".join(_LEN.pack(len(s)) for s in sections) + b"".join(sections)
    return _FRAME_HEAD.pack(_FRAME_VERSION, zlib.crc32(body), len(sections)) + body


def unpack_sections(payload: bytes, expected: int) -> list[bytes]:
    """Split a framed payload; every inconsistency is a CodecError."""
    mv = memoryview(payload)
    if len(mv) < _FRAME_HEAD.size:
        raise CodecError("lossy payload truncated before its header")
    version, crc, count = _FRAME_HEAD.unpack_from(mv, 0)
    if version != _FRAME_VERSION:
        raise CodecError(f"lossy payload frame version {version} is not supported")
    body = mv[_FRAME_HEAD.size :]
    if zlib.crc32(body) != crc:
        raise CodecError("lossy payload checksum mismatch (corrupt or truncated)")
    if count != expected:
        raise CodecError(f"lossy payload has {count} sections, expected {expected}")
    if len(body) < count * _LEN.size:
        raise CodecError("lossy payload truncated in its section table")
    lengths = [_LEN.unpack_from(body, i * _LEN.size)[0] for i in range(count)]
    pos = count * _LEN.size
    if pos + sum(lengths) != len(body):
        raise CodecError("lossy payload section lengths do not add up")
    out = []
    for n in lengths:
        out.append(bytes(body[pos : pos + n]))
        pos += n
    return out


class StagePipeline:
    """transforms -> quantizer -> symbol coder, order checked at construction."""

    def __init__(self, stages: list[object]):
        *transforms, quantizer, coder = stages if len(stages) >= 2 else (None, None)
        if not all(isinstance(t, ArrayTransform) for t in transforms):
            raise CodecError("pipeline: array transforms must come first")
        if not isinstance(quantizer, Quantizer):
            raise CodecError("pipeline: a quantizer must follow the transforms")
        if not isinstance(coder, SymbolCoder):
            raise CodecError("pipeline: a symbol coder must come last")
        self.transforms: list[ArrayTransform] = transforms
        self.quantizer: Quantizer = quantizer
        self.coder: SymbolCoder = coder

    @property
    def releases_gil(self) -> bool:
        """Transforms and quantizers are numpy/BLAS work; the coder decides."""
        return self.coder.releases_gil

    def encode(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        for t in self.transforms:
            x = t.forward(x, ctx)
        blocks = self.quantizer.quantize(x, ctx)
        shapes = self.quantizer.symbol_shapes(ctx)
        if [m.shape for m in blocks.matrices] != [tuple(s) for s in shapes]:
            raise AssertionError("quantizer produced matrices of unexpected shapes")
        sections = [blocks.side] + [self.coder.encode(m) for m in blocks.matrices]
        return pack_sections(sections)

    def decode_blocks(self, payload: bytes, ctx: ChunkContext) -> SymbolBlocks:
        """The payload's sections entropy-decoded: the quantiser's side info and symbols."""
        shapes = self.quantizer.symbol_shapes(ctx)
        sections = unpack_sections(payload, 1 + len(shapes))
        mats = [self.coder.decode(s, shape) for s, shape in zip(sections[1:], shapes)]
        return SymbolBlocks(mats, sections[0], shapes)

    def class_bits(self, payload: bytes, ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray] | None:
        """(elements, bits) per importance class of a chunk coded with classes: each class's
        share of the payload, as the entropy coder's own models price its symbols; None when
        the chunk has no classes or the coder cannot price symbols."""
        shapes = self.quantizer.symbol_shapes(ctx)
        sections = unpack_sections(payload, 1 + len(shapes))
        classes = self.quantizer.element_classes(sections[0], ctx)
        if classes is None:
            return None
        k = self.quantizer.class_count()
        elements, bits = np.zeros(k, np.int64), np.zeros(k)
        for section, shape, cls in zip(sections[1:], shapes, classes):
            lengths = self.coder.code_lengths(section, shape)
            if lengths is None:
                return None
            elements += np.bincount(cls.reshape(-1), minlength=k)
            bits += np.bincount(cls.reshape(-1), weights=lengths.reshape(-1), minlength=k)
        return elements, bits

    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        x = self.quantizer.dequantize(self.decode_blocks(payload, ctx), ctx)
        for t in reversed(self.transforms):
            x = t.inverse(x, ctx)
        return x


class StagedCodec(Codec):
    """A codec that is a :class:`StagePipeline` over its parameters ``_p``: the
    config, the GIL question and the shape check are the pipeline's business.
    Subclasses set ``_p`` and build their pipeline (:meth:`pipeline_for`; by
    default ``self.pipeline``), and may check a chunk further (:meth:`check_chunk`)."""

    _p: dict[str, Any]
    pipeline: StagePipeline

    def params(self) -> dict[str, Any]:
        return dict(self._p)

    @property
    def releases_gil(self) -> bool:
        return self.pipeline.releases_gil

    def pipeline_for(self, ctx: ChunkContext) -> StagePipeline:
        return self.pipeline

    def check_chunk(self, ctx: ChunkContext) -> None:
        """Refuse a chunk this codec cannot code (before any stage runs)."""

    def encode(self, kv: np.ndarray, ctx: ChunkContext) -> bytes:
        if kv.shape != ctx.shape:
            raise CodecError(f"expected KV of shape {ctx.shape}, got {kv.shape}")
        self.check_chunk(ctx)
        return self.pipeline_for(ctx).encode(to_float32(kv, ctx.dtype), ctx)

    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        self.check_chunk(ctx)
        return self.pipeline_for(ctx).decode(payload, ctx)
