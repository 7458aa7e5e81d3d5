"""A model cache whose full-attention layers write new entries into room reserved up front.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every forward: each step
allocates the layer's whole K/V again and frees the old copy.  On a long context that
costs twice the cache at the peak of every step, and on the CPU the freed blocks are
mostly kept by the allocator (glibc stops returning blocks below its adaptive mmap
threshold), so a streamed 8K-token encode of an 8B-geometry model peaked at three times
the cache.  :class:`ReservedLayer` holds one buffer of the size the caller expects the
context to reach (it doubles if a forward runs past it) and hands attention a view of
the filled part: no copy per step, the cache allocated once.

Sliding-window layers keep only their window, so their own ``DynamicSlidingWindowLayer``
stays as it is.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch


def _dynamic_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _ReservedMixin:
    """The behaviour; mixed into transformers' ``DynamicLayer`` by :func:`reserved_layer`."""

    capacity: int

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]
        self._k = self._v = None

    def _room(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Make the buffers hold at least ``needed`` positions, keeping what is filled."""
        keys, values = self.keys, self.values  # type: ignore[attr-defined]
        filled = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
        size = max(needed, self.capacity, 2 * (self._k.shape[-2] if self._k is not None else 0))
        batch, heads, _, dim = like_k.shape
        k = torch.empty((batch, heads, size, dim), dtype=like_k.dtype, device=like_k.device)
        v = torch.empty((batch, heads, size, like_v.shape[-1]), dtype=like_v.dtype, device=like_v.device)
        if filled:
            k[:, :, :filled].copy_(keys)
            v[:, :, :filled].copy_(values)
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, :filled], v[:, :, :filled]

    def _owns(self) -> bool:
        """Whether ``keys``/``values`` are still views of the buffers' start (something may
        have replaced them: a crop keeps them, a batch reorder does not)."""
        k = self._k
        keys, values = self.keys, self.values  # type: ignore[attr-defined]
        return (k is not None and keys is not None and keys.dim() == 4 and keys.data_ptr() == k.data_ptr()
                and values.data_ptr() == self._v.data_ptr() and keys.stride() == k.stride()
                and values.stride() == self._v.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # type: ignore[attr-defined]
            self.lazy_initialization(key_states, value_states)
        filled = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # type: ignore[attr-defined]
        new = key_states.shape[-2]
        if not self._owns() or filled + new > self._k.shape[-2]:
            self._room(filled + new, key_states, value_states)
        self._k[:, :, filled : filled + new].copy_(key_states)
        self._v[:, :, filled : filled + new].copy_(value_states)
        self.keys = self._k[:, :, : filled + new]
        self.values = self._v[:, :, : filled + new]
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        """Take ``keys``/``values`` ([B, H, capacity, D], written by the caller) as the
        buffers, ``filled`` positions of them in use."""
        super().lazy_initialization(keys, values)  # type: ignore[misc]
        self._k, self._v = keys, values
        self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()  # type: ignore[misc]


@functools.cache
def _layer_class(mixin: type, name: str) -> type:
    """``mixin`` over transformers' ``DynamicLayer``, made once (transformers is imported
    on first use, as everywhere in kvzip)."""
    return type(name, (mixin, _dynamic_layer()), {})


def reserved_layer(capacity: int) -> Any:
    """A full-attention cache layer with room for ``capacity`` positions."""
    layer = _layer_class(_ReservedMixin, "ReservedLayer")()
    layer.capacity = max(1, int(capacity))
    layer._k = layer._v = None
    return layer


def new_cache(config: Any, capacity: int | None = None, offload: str | None = None) -> Any:
    """A DynamicCache for ``config``; with ``capacity``, its full-attention layers reserve
    room for that many positions (sliding ones keep transformers' own layer); with
    ``offload`` (a directory), they live in unlinked files there instead (:func:`disk_layer`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if capacity is not None or offload is not None:
        for i, layer in enumerate(cache.layers):
            if type(layer) is _dynamic_layer():
                cache.layers[i] = disk_layer(offload) if offload is not None else reserved_layer(capacity)
    return cache


def close_cache(cache: Any) -> None:
    """Close the files of a cache's disk layers (nothing else needs closing)."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "close"):
            layer.close()


class _DiskMixin:
    """A full-attention layer whose K/V live in an unlinked file, not in memory: each
    forward appends its new entries and reads the layer's whole K/V back for attention,
    which frees it once the layer is done.  The process then holds one layer's K/V at a
    time instead of the whole cache; the file sits in the page cache, which the kernel
    may drop (it is not the process's memory), so a CPU prefill of a cache larger than the
    memory left still runs.  The values read back are the bytes written: the cache is the
    same as in memory."""

    def setup(self, directory: str | None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".kvzip-prefill-")  # unlinked: no litter
        self._filled = 0
        self._row = 0  # bytes of one position's K (or V) across heads

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # type: ignore[misc]
        self._dtype = key_states.dtype
        self._heads, self._dim = key_states.shape[1], key_states.shape[3]
        self._row = self._heads * self._dim * key_states.element_size()
        self._shape_only()

    def _shape_only(self) -> None:
        """``keys``/``values`` as shape-only (meta) tensors: what code that looks at the
        layer's size sees; reading their values is an error, not a silent zero."""
        shape = (1, self._heads, self._filled, self._dim)
        self.keys = torch.empty(shape, dtype=self._dtype, device="meta")
        self.values = torch.empty(shape, dtype=self._dtype, device="meta")

    def _rows(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Read positions ``[lo, hi)`` into ``out`` (``[hi - lo, 2, H, D]``, CPU, contiguous)."""
        view = out.view(torch.uint8).numpy().reshape(-1)
        got = os.preadv(self._file.fileno(), [view], 2 * lo * self._row)
        if got != view.size:
            raise OSError("the prefill's cache file ended early")

    def read(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions ``[lo, hi)``: ``[1, H, n, D]`` each (views of one
        buffer read from the file)."""
        rows = torch.empty((hi - lo, 2, self._heads, self._dim), dtype=self._dtype)
        self._rows(lo, hi, rows)
        return rows[:, 0].permute(1, 0, 2).unsqueeze(0), rows[:, 1].permute(1, 0, 2).unsqueeze(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # type: ignore[attr-defined]
            self.lazy_initialization(key_states, value_states)
        past, new = self._filled, key_states.shape[-2]
        rows = torch.empty((past + new, 2, self._heads, self._dim), dtype=self._dtype)
        if past:
            self._rows(0, past, rows[:past])
        rows[past:, 0] = key_states[0].transpose(0, 1)
        rows[past:, 1] = value_states[0].transpose(0, 1)
        data = rows[past:].view(torch.uint8).numpy().reshape(-1)
        if os.pwrite(self._file.fileno(), data, 2 * past * self._row) != data.size:
            raise OSError("could not write the prefill's cache file (disk full?)")
        self._filled = past + new
        self._shape_only()
        device = key_states.device
        keys = rows[:, 0].permute(1, 0, 2).unsqueeze(0).to(device)
        values = rows[:, 1].permute(1, 0, 2).unsqueeze(0).to(device)
        return keys, values

    def get_seq_length(self) -> int:
        return self._filled if self.is_initialized else 0  # type: ignore[attr-defined]

    def close(self) -> None:
        self._file.close()


def disk_layer(directory: str | None) -> Any:
    """A full-attention cache layer kept in an unlinked file in ``directory``."""
    layer = _layer_class(_DiskMixin, "DiskLayer")()
    layer.setup(directory)
    return layer
