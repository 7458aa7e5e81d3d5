"""A model cache that holds a different set of positions in every (layer, kv head).

A cache pruned by importance (``kvzip encode --keep``) keeps, per kv head, only the
entries its scorer ranked highest, at their true positions.  transformers' caches hold one
``[batch, kv_heads, n, head_dim]`` block per layer, so a head with fewer entries than its
layer's widest would have to be padded with masked entries that still cost memory and
attention time.  :class:`PrunedLayer` instead keeps each head's entries as its own
``[n_h, head_dim]`` tensors with their positions, and an attention function registered
through transformers' attention interface (``"kvzip-pruned"``) computes each kv head's
query group against exactly that head's entries, masked by true position (causal, and
the window in a sliding layer).  New tokens are appended to every head at their true
positions, so generation continues as it would after the whole context.

:func:`pruned_attention` switches a model to it for the forwards inside a ``with`` block;
kvzip does so whenever a cache it built is a pruned one (:func:`is_pruned`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kvzip.formats import LayeredKV, PositionLayout
from kvzip.model.attention import attending_with

NAME = "kvzip-pruned"
# Set inside pruned_attention(): a pruned layer refuses to be read by any other attention.
_ATTENDING: contextvars.ContextVar[bool] = contextvars.ContextVar("kvzip_pruned_attending", default=False)


def _mixin_base() -> type:
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class _PrunedMixin:
    """Per kv head: keys, values ``[capacity_h, head_dim]`` and positions ``[capacity_h]``,
    the first ``count[h]`` in use, sorted by position."""

    is_compileable = False
    is_croppable = False

    def setup(self, positions: Sequence[np.ndarray], token_count: int, window: int | None, head_dim: int,
              room: int, dtype: torch.dtype, device: torch.device) -> None:
        self.window = window
        self.is_sliding = window is not None
        self.next_position = int(token_count)
        self.device = device
        self.count = [int(p.size) for p in positions]
        self.pos = [torch.full((n + room,), -1, dtype=torch.long, device=device) for n in self.count]
        for h, p in enumerate(positions):
            self.pos[h][: p.size].copy_(torch.from_numpy(np.asarray(p, np.int64)))
        self.k = [torch.zeros((n + room, head_dim), dtype=dtype, device=device) for n in self.count]
        self.v = [torch.zeros((n + room, head_dim), dtype=dtype, device=device) for n in self.count]
        self.insert_positions: torch.Tensor | None = None  # set by inserting()
        self.query_positions = torch.zeros(0, dtype=torch.long, device=device)  # the last update's
        self.is_initialized = True
        self._shape_only()

    def _shape_only(self) -> None:
        """``keys``/``values`` as shape-only (meta) tensors of the widest head, for code that
        only looks at a layer's size; reading their values is an error, not a silent zero."""
        shape = (1, len(self.k), max(self.count, default=0), self.k[0].shape[-1] if self.k else 0)
        dtype = self.k[0].dtype if self.k else torch.float32
        self.keys = torch.empty(shape, dtype=dtype, device="meta")
        self.values = torch.empty(shape, dtype=dtype, device="meta")

    def write(self, head: int, slots: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill ``slots`` of head ``head`` (``keys``/``values`` ``[n, head_dim]``)."""
        self.k[head][slots].copy_(keys)
        self.v[head][slots].copy_(values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a pruned cache layer is built with its entries (kvzip.model.pruned)")

    def _evict(self) -> None:
        """A sliding layer drops what no query from ``next_position`` on can see."""
        if self.window is None:
            return
        oldest = self.next_position - self.window  # a query at p sees positions > p - window
        for h in range(len(self.k)):
            n = self.count[h]
            gone = int((self.pos[h][:n] <= oldest).sum())
            if gone:
                for buf in (self.pos[h], self.k[h], self.v[h]):
                    buf[: n - gone] = buf[gone:n].clone()
                self.count[h] = n - gone

    def _sort(self) -> None:
        """Each head's entries back in position order (after :func:`inserting`)."""
        for h in range(len(self.k)):
            n = self.count[h]
            order = torch.argsort(self.pos[h][:n])
            for buf in (self.pos[h], self.k[h], self.v[h]):
                buf[:n] = buf[:n][order]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ([1, H, q, D]) to every head at the next
        positions (inside :func:`inserting`, at the positions it gives).  Returns the new
        states, marked with this layer for :func:`attend`, which reads every head's
        entries from here."""
        if key_states.shape[0] != 1:
            raise ValueError("a pruned cache holds one sequence")
        if not _ATTENDING.get():
            # the model's own attention would read only the new states handed back here
            raise RuntimeError("a pruned cache (a .kvz written with --keep) needs kvzip's attention: "
                               "run the model inside kvzip.pruned_attention(model, cache)")
        q = key_states.shape[-2]
        if self.insert_positions is None:
            self._evict()
            new_pos = torch.arange(self.next_position, self.next_position + q, device=self.device)
        else:  # tokens read inside the context: nothing is evicted, the context's length stays
            new_pos = self.insert_positions
            if new_pos.numel() != q:
                raise ValueError(f"{new_pos.numel()} insert positions for {q} new tokens")
        for h in range(len(self.k)):
            n = self.count[h]
            if n + q > self.k[h].shape[0]:
                size = max(n + q, 2 * self.k[h].shape[0])
                self.pos[h] = _grown(self.pos[h], size, n, -1)
                self.k[h] = _grown(self.k[h], size, n, 0)
                self.v[h] = _grown(self.v[h], size, n, 0)
            self.pos[h][n : n + q] = new_pos
            self.k[h][n : n + q] = key_states[0, h]
            self.v[h][n : n + q] = value_states[0, h]
            self.count[h] = n + q
        self.query_positions = new_pos
        if self.insert_positions is None:
            self.next_position += q
        self._shape_only()
        key_states._kvzip_pruned = self  # noqa: SLF001 - read by attend()
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.next_position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.next_position + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        raise RuntimeError("a pruned cache cannot be reset; attach the file again")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("a pruned cache holds one sequence (no beam search)")


def _grown(t: torch.Tensor, size: int, filled: int, fill: float) -> torch.Tensor:
    """``t`` with room for ``size`` rows, its first ``filled`` kept, the rest ``fill``."""
    out = t.new_full((size, *t.shape[1:]), fill)
    out[:filled] = t[:filled]
    return out


@functools.cache
def _layer_class() -> type:
    return type("PrunedLayer", (_PrunedMixin, _mixin_base()), {})


def pruned_layer(positions: Sequence[np.ndarray], token_count: int, window: int | None, head_dim: int,
                 room: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A cache layer holding ``positions[h]`` (sorted) in kv head ``h``, entries zero until
    written (:meth:`write`), with ``room`` more per head for new tokens."""
    layer = _layer_class()()
    layer.setup(positions, token_count, window, head_dim, room, dtype, device)
    return layer


def is_pruned(cache: Any) -> bool:
    """Whether ``cache`` holds pruned layers (and so needs :func:`pruned_attention`)."""
    return any(isinstance(layer, _PrunedMixin) for layer in getattr(cache, "layers", ()))


def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over a :class:`PrunedLayer`: each kv head's query group against that
    head's entries and the new tokens, masked by true position.  ``query`` [1, Hq, q, D];
    ``key`` the new keys :meth:`update` returned (marked with their layer)."""
    layer = getattr(key, "_kvzip_pruned", None)
    if layer is None:
        raise RuntimeError("kvzip-pruned attention runs only over a pruned cache")
    _, hq, q, _ = query.shape
    heads = len(layer.k)
    group = hq // heads
    scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
    q_pos = layer.query_positions
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    out = torch.empty((1, q, hq, query.shape[-1]), dtype=query.dtype, device=query.device)
    for h in range(heads):
        n = layer.count[h]
        pos = layer.pos[h][:n]
        k, v = layer.k[h][:n], layer.v[h][:n]
        visible = pos[None, :] <= q_pos[:, None]
        if layer.window is not None:
            visible &= pos[None, :] > q_pos[:, None] - layer.window
        qh = query[0, h * group : (h + 1) * group]  # [g, q, D]
        if softcap or sinks is not None:
            scores = torch.matmul(qh, k.T.to(qh.dtype)) * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
            if sinks is not None:  # a learned logit per query head that takes part in the softmax
                sink = sinks[h * group : (h + 1) * group].reshape(group, 1, 1).expand(group, q, 1).to(scores.dtype)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores.float(), dim=-1)
            o = torch.matmul(probs.to(v.dtype), v)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qh[None], k[None, None].expand(1, group, n, k.shape[-1]),
                v[None, None].expand(1, group, n, v.shape[-1]), attn_mask=visible[None, None], scale=scale)[0]
        out[0, :, h * group : (h + 1) * group] = o.transpose(0, 1)
    return out, None


@contextlib.contextmanager
def inserting(cache: Any, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, the tokens a forward reads go to ``positions`` (a [q] tensor, none
    of them held yet) in every pruned layer of ``cache``, each seeing the entries at or
    before its position (in a sliding layer, inside its window), instead of going after
    the context; afterwards each head's entries are in position order again.  The model
    must be given the same positions (``position_ids``) for its RoPE."""
    layers = [layer for layer in cache.layers if isinstance(layer, _PrunedMixin)]
    for layer in layers:
        layer.insert_positions = positions.to(layer.device)
    try:
        yield
    finally:
        for layer in layers:
            layer.insert_positions = None
            layer._sort()  # noqa: SLF001


def captured(cache: Any, token_count: int) -> LayeredKV:
    """What a pruned cache holds, as a :class:`LayeredKV` on the CPU (each head's entries
    in position order, a shorter head padded at the end)."""
    positions, layers = [], []
    for layer in cache.layers:
        pos = [layer.pos[h][:n].cpu().numpy() for h, n in enumerate(layer.count)]
        k0 = layer.k[0]
        out = torch.zeros((2, len(pos), max(layer.count, default=0), k0.shape[-1]), dtype=k0.dtype)
        for h, n in enumerate(layer.count):
            out[0, h, :n] = layer.k[h][:n].cpu()
            out[1, h, :n] = layer.v[h][:n].cpu()
        positions.append(pos)
        layers.append(out)
    return LayeredKV(layers, PositionLayout(positions, token_count))


@contextlib.contextmanager
def pruned_attention(model: Any, cache: Any) -> Iterator[None]:
    """Inside the block, ``model`` attends with :func:`attend` when ``cache`` is pruned
    (and as before otherwise).  No mask function goes with it: the mask builders then hand
    over None, and :func:`attend` masks by the true positions the layer holds."""
    if not is_pruned(cache):
        yield
        return
    token = _ATTENDING.set(True)
    try:
        with attending_with(model, NAME, attend):
            yield
    finally:
        _ATTENDING.reset(token)
