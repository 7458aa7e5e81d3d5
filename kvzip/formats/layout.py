"""Which context positions each (layer, kv head) holds: the ``.kvz`` 2.x position layout.

A dense cache holds every position ``0..T-1`` in every layer and head; that is the
only layout a 1.x file can describe.  A sliding-window layer keeps only the last
``window - 1`` positions, and a pruned cache keeps a different subset per head, so
a 2.x file records, for every (layer, kv head), its sorted set of positions.  The
layout is bytes-level knowledge (no codecs, no torch): it is encoded into the header
(``docs/format.md``, "Position layout"), validated before any payload is read, and
answers the questions readers and writers ask of it: what a chunk holds, how the
chunk splits into codec blocks, how many elements a level decodes to.

Binary encoding (``kvz-positions/1``, then one zstd frame, then base64 in the JSON
header): ``u32 layers, u32 heads, u32 tokens``, then one record per (layer, head) in
layer-major order, each a ``u8`` kind:

* ``0``: the same positions as the previous record;
* ``1``: runs: a varint run count, then per run a varint gap (from the end of the
  previous run, or from 0) and a varint length (> 0);
* ``2``: a bitmap of ``ceil(tokens / 8)`` bytes, bit ``t % 8`` of byte ``t // 8``
  set when position ``t`` is held.

Varints are unsigned LEB128 (7 bits a byte, least significant first, at most 5 bytes).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import zstandard

from kvzip.compression import zstd_decompress_bounded
from kvzip.errors import HeaderError, UnsupportedModelError
from kvzip.formats.limits import check_memory

ENCODING = "kvz-positions/1"
_SAME, _RUNS, _BITMAP = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Block:
    """Part of a chunk one codec call codes: these layers and heads, at these positions
    (sorted, shared by every one of its (layer, head) pairs), with one RoPE table."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    positions: np.ndarray = field(repr=False)  # int64, sorted, unique
    rope_table: int | None = None

    @property
    def count(self) -> int:
        return int(self.positions.size)


class PositionLayout:
    """The sorted positions of every (layer, kv head) of a context of ``token_count`` tokens.

    ``positions[layer][head]`` is an int64 array; heads (and layers) that hold the same
    positions share one array object, so a dense or windowed layout costs a few arrays.
    """

    def __init__(self, positions: Sequence[Sequence[np.ndarray]], token_count: int):
        self.positions = [list(heads) for heads in positions]
        self.token_count = int(token_count)
        if not self.positions or not self.positions[0]:
            raise HeaderError("a position layout needs at least one layer and one head")
        if len({len(h) for h in self.positions}) != 1:
            raise HeaderError("every layer of a position layout needs the same number of heads")

    # ------------------------------------------------------------- construction
    @classmethod
    def dense(cls, num_layers: int, kv_heads: int, token_count: int) -> PositionLayout:
        every = np.arange(token_count, dtype=np.int64)
        return cls([[every] * kv_heads for _ in range(num_layers)], token_count)

    @classmethod
    def from_counts(cls, kept: Sequence[int], kv_heads: int, token_count: int) -> PositionLayout:
        """Layer ``i`` holds the last ``kept[i]`` positions in every head (a window)."""
        layers = []
        for n in kept:
            if not 0 <= n <= token_count:
                raise HeaderError(f"a layer cannot keep {n} of {token_count} positions")
            layers.append([np.arange(token_count - n, token_count, dtype=np.int64)] * kv_heads)
        return cls(layers, token_count)

    @property
    def num_layers(self) -> int:
        return len(self.positions)

    @property
    def kv_heads(self) -> int:
        return len(self.positions[0])

    # ---------------------------------------------------------------- questions
    def is_dense(self) -> bool:
        """Every (layer, head) holds every position: what a 1.x file describes."""
        t = self.token_count
        return all(p.size == t and (t == 0 or (p[0] == 0 and p[-1] == t - 1))
                   for heads in self.positions for p in heads)

    def layer_positions(self, layer: int) -> np.ndarray:
        """The layer's positions ``[heads, n]`` when its heads hold the same number of
        positions; heads with fewer are padded at the end with -1 (``decode``'s contract)."""
        heads = self.positions[layer]
        width = max(p.size for p in heads)
        out = np.full((len(heads), width), -1, np.int64)
        for h, p in enumerate(heads):
            out[h, : p.size] = p
        return out

    def layer_width(self, layer: int) -> int:
        return max(p.size for p in self.positions[layer])

    def heads_share(self, layer: int) -> bool:
        heads = self.positions[layer]
        return all(p is heads[0] or np.array_equal(p, heads[0]) for p in heads[1:])

    def stored(self) -> int:
        """Positions held, summed over every (layer, head)."""
        return sum(int(p.size) for heads in self.positions for p in heads)

    def slot(self, layer: int, head: int, position: int) -> int:
        """Where ``position`` sits among the positions ``(layer, head)`` holds (the first
        held one after it, if it is not held): the slot a block that starts there is
        written at in that head's own entries.  Heads need not agree on it: each head of a
        block may hold different positions before the block."""
        return int(np.searchsorted(self.positions[layer][head], position))

    def in_range(self, layer: int, head: int, start: int, end: int) -> np.ndarray:
        p = self.positions[layer][head]
        lo, hi = np.searchsorted(p, [start, end])
        return p[lo:hi]

    def chunk_stored(self, start: int, end: int) -> int:
        """Positions in ``[start, end)`` held, summed over every (layer, head)."""
        total = 0
        for heads in self.positions:
            for p in heads:
                lo, hi = np.searchsorted(p, [start, end])
                total += int(hi - lo)
        return total

    def chunk_layers(self, start: int, end: int) -> list[int]:
        """The layers that hold at least one position in ``[start, end)``."""
        return [i for i, heads in enumerate(self.positions)
                if any(np.searchsorted(p, start) < np.searchsorted(p, end) for p in heads)]

    def blocks(self, start: int, end: int, rope_tables: Sequence[int] | None = None) -> list[Block]:
        """How the chunk ``[start, end)`` is coded: layers whose heads all hold the same
        positions there are grouped (with every head) with the other such layers that hold
        the same positions and use the same RoPE table; a layer whose heads differ is coded
        head by head.  Blocks holding nothing are left out.  The order (by first layer,
        then head) is the order of the blocks in a chunk's payload."""
        groups: dict[tuple, list[int]] = {}
        positions: dict[tuple, np.ndarray] = {}
        singles: list[Block] = []
        all_heads = tuple(range(self.kv_heads))
        for layer, heads in enumerate(self.positions):
            table = None if rope_tables is None else int(rope_tables[layer])
            parts = [self.in_range(layer, h, start, end) for h in range(len(heads))]
            if all(np.array_equal(parts[0], q) for q in parts[1:]):
                if parts[0].size == 0:
                    continue
                key = (table, parts[0].tobytes())
                groups.setdefault(key, []).append(layer)
                positions.setdefault(key, parts[0])
            else:
                singles.extend(Block((layer,), (h,), q, table) for h, q in enumerate(parts) if q.size)
        merged = [Block(tuple(layers), all_heads, positions[key], key[0]) for key, layers in groups.items()]
        return sorted(merged + singles, key=lambda b: (b.layers[0], b.heads[0]))

    # ------------------------------------------------------------------- bytes
    def to_bytes(self) -> bytes:
        out = bytearray()
        out += np.array([self.num_layers, self.kv_heads, self.token_count], "<u4").tobytes()
        previous: np.ndarray | None = None
        bitmap_bytes = (self.token_count + 7) // 8
        for heads in self.positions:
            for p in heads:
                if previous is not None and (p is previous or np.array_equal(p, previous)):
                    out.append(_SAME)
                    continue
                runs = _runs_record(p)
                if len(runs) <= bitmap_bytes:
                    out.append(_RUNS)
                    out += runs
                else:
                    bits = np.zeros(bitmap_bytes * 8, np.uint8)
                    bits[p] = 1
                    out.append(_BITMAP)
                    out += np.packbits(bits, bitorder="little").tobytes()
                previous = p
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, num_layers: int, kv_heads: int, token_count: int) -> PositionLayout:
        """Parse and check a layout for the header's geometry (``HeaderError`` if broken)."""
        if len(data) < 12:
            raise HeaderError("header field 'positions' is truncated")
        layers, heads, tokens = (int(x) for x in np.frombuffer(data[:12], "<u4"))
        if (layers, heads, tokens) != (num_layers, kv_heads, token_count):
            raise HeaderError(
                f"header field 'positions' describes {layers} layers x {heads} heads x {tokens} tokens, "
                f"the header {num_layers} x {kv_heads} x {token_count}")
        reader = _Bytes(data, 12)
        bitmap_bytes = (tokens + 7) // 8
        out: list[list[np.ndarray]] = []
        previous: np.ndarray | None = None
        held = 0  # positions materialised so far (int64 each), priced before each allocation
        for _ in range(layers):
            row = []
            for _ in range(heads):
                kind = reader.byte()
                if kind == _SAME:
                    if previous is None:
                        raise HeaderError("header field 'positions' repeats a record before the first")
                    row.append(previous)
                    continue
                if kind == _RUNS:
                    p, held = _parse_runs(reader, tokens, held)
                elif kind == _BITMAP:
                    bits = np.unpackbits(np.frombuffer(reader.take(bitmap_bytes), np.uint8), bitorder="little")
                    if bits[tokens:].any():
                        raise HeaderError("header field 'positions' marks a position past the context")
                    held += int(bits.sum())
                    _check_held(held)
                    p = np.flatnonzero(bits[:tokens]).astype(np.int64)
                else:
                    raise HeaderError(f"header field 'positions' has a record of unknown kind {kind}")
                row.append(p)
                previous = p
            out.append(row)
        if reader.at != len(data):
            raise HeaderError("header field 'positions' has bytes after its last record")
        return cls(out, tokens)

    def to_json(self) -> dict:
        raw = self.to_bytes()
        frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(raw)
        return {"encoding": ENCODING, "data": base64.b64encode(frame).decode("ascii")}

    @classmethod
    def from_json(cls, value: object, num_layers: int, kv_heads: int, token_count: int) -> PositionLayout:
        if not isinstance(value, dict) or value.get("encoding") != ENCODING:
            raise HeaderError(f"header field 'positions' must be an object with encoding {ENCODING!r}")
        data = value.get("data")
        if not isinstance(data, str):
            raise HeaderError("header field 'positions.data' must be a base64 string")
        try:
            frame = base64.b64decode(data.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise HeaderError("header field 'positions.data' is not base64") from None
        # The largest honest encoding: every record a bitmap (runs are used only when smaller).
        limit = 12 + num_layers * kv_heads * (1 + (token_count + 7) // 8)
        check_memory(min(limit, max(0, _declared_size(frame))), "reading the header's position layout")
        raw = zstd_decompress_bounded(frame, limit, "header field 'positions'", HeaderError)
        return cls.from_bytes(raw, num_layers, kv_heads, token_count)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        return iter(self.positions)


def _declared_size(frame: bytes) -> int:
    try:
        return zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        return 0  # zstd_decompress_bounded reports it


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _runs_record(p: np.ndarray) -> bytes:
    if p.size == 0:
        return _varint(0)
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [p.size]])
    out = bytearray(_varint(len(starts)))
    previous_end = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        first = int(p[s])
        out += _varint(first - previous_end)
        out += _varint(e - s)
        previous_end = first + (e - s)
    return bytes(out)


class _Bytes:
    def __init__(self, data: bytes, at: int):
        self.data, self.at = data, at

    def byte(self) -> int:
        if self.at >= len(self.data):
            raise HeaderError("header field 'positions' is truncated")
        self.at += 1
        return self.data[self.at - 1]

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise HeaderError("header field 'positions' is truncated")
        self.at += n
        return self.data[self.at - n : self.at]

    def varint(self) -> int:
        n = shift = 0
        for _ in range(5):
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise HeaderError("header field 'positions' has a varint longer than 5 bytes")


def _check_held(held: int) -> None:
    check_memory(8 * held, "reading the header's position layout")


def _parse_runs(reader: _Bytes, tokens: int, held: int) -> tuple[np.ndarray, int]:
    count = reader.varint()
    if count > (tokens + 1) // 2:
        raise HeaderError(f"header field 'positions' declares {count} runs in {tokens} tokens")
    runs = []
    end = 0
    for _ in range(count):
        gap, length = reader.varint(), reader.varint()
        start = end + gap
        if length == 0 or (gap == 0 and end > 0) or start + length > tokens:
            raise HeaderError("header field 'positions' has an empty, touching or out-of-range run")
        runs.append((start, length))
        end = start + length
    held += sum(n for _, n in runs)
    _check_held(held)  # a few bytes of runs can stand for millions of positions
    pieces = [np.arange(start, start + n, dtype=np.int64) for start, n in runs]
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), held


class LayeredKV:
    """A cache as its layers: ``layers[i]`` is ``[2, kv_heads, n_i, head_dim]`` (keys, then
    values; numpy or torch, any dtype), holding the positions ``layout`` gives layer ``i``
    in order (a head with fewer than the layer's widest is padded at the end, its padding
    positions -1 in :meth:`PositionLayout.layer_positions`).

    When every layer holds every position, ``dense`` is the ``[2, L, H, T, D]`` array the
    layers are views of; the paths that need one block (the codecs of a 1.x file) use it
    without a copy.
    """

    def __init__(self, layers: Sequence, layout: PositionLayout, dense: object = None):
        self.layers = list(layers)
        self.layout = layout
        self.dense = dense
        if len(self.layers) != layout.num_layers:
            raise ValueError(f"{len(self.layers)} layers for a layout of {layout.num_layers}")
        for i, layer in enumerate(self.layers):
            want = (2, layout.kv_heads, layout.layer_width(i))
            if tuple(layer.shape[:3]) != want:
                raise ValueError(f"layer {i} has shape {tuple(layer.shape)}, its layout needs {want} x head_dim")

    @classmethod
    def from_dense(cls, kv: object) -> LayeredKV:
        """Views of one ``[2, L, H, T, D]`` array."""
        _, layers, heads, tokens, _ = kv.shape
        return cls([kv[:, i] for i in range(layers)], PositionLayout.dense(layers, heads, tokens), kv)

    @property
    def token_count(self) -> int:
        return self.layout.token_count

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_heads(self) -> int:
        return self.layout.kv_heads

    @property
    def head_dim(self) -> int:
        return int(self.layers[0].shape[-1])

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    def elements(self) -> int:
        """K and V elements held (padding included)."""
        return sum(2 * int(layer.shape[1]) * int(layer.shape[2]) * int(layer.shape[3]) for layer in self.layers)

    def dense_array(self, what: str = "this operation") -> object:
        """The ``[2, L, H, T, D]`` array, for paths that handle only dense caches."""
        if self.dense is None:
            raise UnsupportedModelError(
                f"{what} needs every layer to hold every position; this cache keeps "
                f"{self.layout.stored()} of {self.num_layers * self.kv_heads * self.token_count} "
                "(sliding-window layers or pruned tokens)")
        return self.dense

    def map(self, fn) -> LayeredKV:  # noqa: ANN001 - array -> array
        """The same cache with ``fn`` applied to its arrays (a dtype cast, a device move);
        a dense cache stays one array."""
        if self.dense is not None:
            dense = fn(self.dense)
            return LayeredKV([dense[:, i] for i in range(self.num_layers)], self.layout, dense)
        return LayeredKV([fn(layer) for layer in self.layers], self.layout)

    def subset(self, masks: Sequence[np.ndarray], token_count: int | None = None) -> LayeredKV:
        """The cache holding only the slots ``masks`` (per layer ``[heads, width]`` bool)
        keep, each head's entries first in its layer's array (a head with fewer padded with
        zeros at the end), numpy or torch as this cache is.  ``token_count``: the context
        length of the result (default: this one's)."""
        t = self.token_count if token_count is None else int(token_count)
        positions, layers = [], []
        for i, (layer, mask) in enumerate(zip(self.layers, masks)):
            held = self.layout.positions[i]
            idx = [np.flatnonzero(mask[h, : p.size]) for h, p in enumerate(held)]
            pos = [held[h][ix] for h, ix in enumerate(idx)]
            if all(np.array_equal(pos[0], p) for p in pos[1:]):
                pos = [pos[0]] * len(pos)  # shared arrays: the layout codes them once
            shape = (2, len(held), max(p.size for p in pos), int(layer.shape[-1]))
            if isinstance(layer, np.ndarray):
                out = np.zeros(shape, layer.dtype)
                for h, ix in enumerate(idx):
                    out[:, h, : ix.size] = layer[:, h, ix]
            else:  # torch, imported by whoever made the tensor
                out = layer.new_zeros(shape)
                for h, ix in enumerate(idx):
                    out[:, h, : ix.size] = layer[:, h, ix.tolist()]
            positions.append(pos)
            layers.append(out)
        return LayeredKV(layers, PositionLayout(positions, t))

    def __repr__(self) -> str:
        kind = "dense" if self.is_dense else "layered"
        return (f"LayeredKV({kind}, {self.num_layers} layers x {self.kv_heads} heads, "
                f"{self.token_count} tokens, {self.layout.stored()} (layer, head, position) entries)")
