"""Placing independently prefilled passages side by side in one prompt's cache.

A passage cached at positions 0..n-1 is moved to offset ``o`` by rotating its
keys ``o`` positions further (values carry no position).  For plain RoPE this is
exact: the rotations at positions p and p+o compose, R(o)·R(p) = R(p+o), so the
moved keys equal the keys the model would compute for the same pre-RoPE vectors
at p+o (up to float rounding).  What is *not* reproduced is cross-attention:
deeper layers of a passage prefilled after other text see that text, a passage
prefilled alone does not.  CacheBlend's remedy, simplified: recompute the first
tokens of each passage with the real preceding context (``blend_fraction``),
where the missing context matters most, and reuse the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvzip.errors import InputError
from kvzip.formats import LayeredKV, PositionLayout

if TYPE_CHECKING:  # torch and the model load when a passage is read or assembled
    import torch

    from kvzip.model import KVModel


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: Sequence[float]) -> torch.Tensor:
    """Keys ``[..., T, D]`` after RoPE, moved ``delta`` positions later.

    Follows transformers' ``rotate_half`` convention: dimension i and i + D/2 form
    one pair, rotated by ``position * inv_freq[i]``.  The angle is computed in
    float64 and applied in at least float32, then cast back to the keys' dtype.
    """
    import torch

    if delta == 0:
        return keys
    half = keys.shape[-1] // 2
    if len(inv_freq) != half:
        raise InputError(f"{len(inv_freq)} RoPE frequencies for head_dim {keys.shape[-1]}")
    angle = delta * torch.tensor(inv_freq, dtype=torch.float64)
    work = torch.promote_types(keys.dtype, torch.float32)
    cos, sin = angle.cos().to(work), angle.sin().to(work)
    k = keys.to(work)
    k1, k2 = k[..., :half], k[..., half:]
    return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1).to(keys.dtype)


def rotate_layers(keys: torch.Tensor, delta: int, layer_freqs: Sequence[Sequence[float]]) -> torch.Tensor:
    """Keys ``[L, H, T, D]`` moved ``delta`` positions later, layer ``i`` with its own
    RoPE frequencies ``layer_freqs[i]`` (Gemma 3's local and global bases differ)."""
    import torch

    if delta == 0:
        return keys
    tables = list(dict.fromkeys(tuple(f) for f in layer_freqs))
    if len(tables) == 1:
        return rotate_keys(keys, delta, tables[0])
    return torch.stack([rotate_keys(keys[i], delta, f) for i, f in enumerate(layer_freqs)])


def move_kv(kv: torch.Tensor, delta: int, layer_freqs: Sequence[Sequence[float]]) -> torch.Tensor:
    """A cache ``[2, L, H, T, D]`` moved ``delta`` positions later (keys rotated, values kept)."""
    import torch

    return torch.stack([rotate_layers(kv[0], delta, layer_freqs), kv[1]])


@dataclass
class CachedPassage:
    """A passage's token ids and its cache at positions 0..n-1, with each layer's RoPE
    frequencies: ``[2, L, H, n, D]`` when every layer holds every position (a passage fits
    every attention window), or the entries each (layer, kv head) kept (``--keep``)."""

    token_ids: list[int]
    kv: torch.Tensor | LayeredKV
    layer_freqs: Sequence[Sequence[float]]

    @property
    def is_pruned(self) -> bool:
        return isinstance(self.kv, LayeredKV) and not self.kv.is_dense


def assemble(
    km: KVModel,
    prefix_ids: Sequence[int],
    passages: Sequence[CachedPassage],
    *,
    blend_fraction: float = 0.0,
    prefix_kv: torch.Tensor | None = None,
    recompute_window: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """(context ids, their cache): ``prefix_ids`` followed by each passage moved to its offset.

    The assembled cache holds every position in every layer; attaching it to a model
    with sliding-window layers keeps their last ``window - 1`` positions.  Those are
    the passages' own keys moved there, or, with ``recompute_window``, the sliding
    layers' keys and values of that window recomputed in one pass from the text with
    the assembled context before it (``docs/benchmarks.md`` measures both).

    ``prefix_kv`` is the prefix's cache when the caller has it (ask keeps the chat
    opening's; see :mod:`kvzip.store.opening`), else the prefix is prefilled here.
    The cache is written once into one tensor: no per-passage stacking or concatenation.
    With ``blend_fraction`` F > 0, the first ceil(F·n) tokens of every passage that has
    text before it are recomputed from that text instead of reused, all of them in
    one forward pass (:meth:`KVModel.extend_at`): each recomputed token sees the
    context before it, the recomputed tokens of earlier passages included, exactly as
    recomputing passage by passage would.
    """
    import torch

    if not 0.0 <= blend_fraction <= 1.0:
        raise InputError(f"--blend-recompute must be between 0 and 1, got {blend_fraction}")
    if not passages:
        raise InputError("no passages to assemble")
    ids = list(prefix_ids)
    if ids and prefix_kv is None:
        prefix_kv = km.prefill(ids).dense_array("a RAG prefix")
    if prefix_kv is not None and prefix_kv.shape[3] != len(ids):
        raise InputError(f"a prefix cache of {prefix_kv.shape[3]} tokens for {len(ids)} prefix ids")
    if any(p.is_pruned for p in passages):
        return _assemble_pruned(km, ids, passages, blend_fraction, prefix_kv, recompute_window)
    total = len(ids) + sum(len(p.token_ids) for p in passages)
    like = prefix_kv if prefix_kv is not None else passages[0].kv
    kv = torch.empty((*like.shape[:3], total, like.shape[4]), dtype=like.dtype)
    if prefix_kv is not None:
        kv[:, :, :, : len(ids)] = prefix_kv
    redo_ids: list[int] = []
    redo_positions: list[int] = []
    for passage in passages:
        offset, n = len(ids), len(passage.token_ids)
        redo = math.ceil(blend_fraction * n) if offset else 0
        if redo:
            redo_ids += passage.token_ids[:redo]
            redo_positions += range(offset, offset + redo)
        if redo < n:
            part = passage.kv[:, :, :, redo:]
            kv[0, :, :, offset + redo : offset + n] = rotate_layers(part[0], offset, passage.layer_freqs)
            kv[1, :, :, offset + redo : offset + n] = part[1]
        ids.extend(passage.token_ids)
    if redo_ids:
        # The slots being recomputed hold nothing yet: zero and hide them, then fill them.
        slots = torch.tensor(redo_positions)
        kv[:, :, :, slots] = 0
        visible = torch.ones(total, dtype=torch.bool)
        visible[slots] = False
        fresh = km.extend_at(kv, redo_ids, redo_positions, visible=visible)
        kv[:, :, :, slots] = fresh.to(kv.dtype)
    window = km.sliding_window
    if recompute_window and window is not None:
        start = max(len(prefix_ids), total - (window - 1))  # the prefix is its own prefill already
        if start < total:
            visible = torch.ones(total, dtype=torch.bool)
            visible[start:] = False
            fresh = km.extend_at(kv, ids[start:], range(start, total), visible=visible)
            for i, w in enumerate(km.layer_windows()):
                if w is not None:
                    kv[:, i, :, start:] = fresh[:, i].to(kv.dtype)
    return ids, kv


def _assemble_pruned(
    km: KVModel,
    prefix_ids: list[int],
    passages: Sequence[CachedPassage],
    blend_fraction: float,
    prefix_kv: torch.Tensor | None,
    recompute_window: bool,
) -> tuple[list[int], LayeredKV]:
    """:func:`assemble` when some passage kept only some entries per (layer, kv head): the
    result is a pruned cache (each head its own positions), the same steps on it.  The
    recomputed tokens (``blend_fraction``, ``recompute_window``) are read in every head
    (:meth:`KVModel.insert_at`), as a full prefill would hold them."""
    import torch

    L, H = km.num_layers, km.kv_heads
    ids = list(prefix_ids)
    lead = passages[0].kv
    dtype = prefix_kv.dtype if prefix_kv is not None else (lead.layers[0] if isinstance(lead, LayeredKV) else lead).dtype
    pos: list[list[list[np.ndarray]]] = [[[] for _ in range(H)] for _ in range(L)]
    ent: list[list[list[torch.Tensor]]] = [[[] for _ in range(H)] for _ in range(L)]  # [2, n, D] each
    if prefix_kv is not None:
        for i in range(L):
            for h in range(H):
                pos[i][h].append(np.arange(len(ids), dtype=np.int64))
                ent[i][h].append(prefix_kv[:, i, h].to(dtype))
    redo_ids: list[int] = []
    redo_positions: list[int] = []
    for passage in passages:
        offset, n = len(ids), len(passage.token_ids)
        redo = math.ceil(blend_fraction * n) if offset else 0
        redo_ids += passage.token_ids[:redo]
        redo_positions += range(offset, offset + redo)
        kv = passage.kv if isinstance(passage.kv, LayeredKV) else LayeredKV.from_dense(passage.kv)
        for i, layer in enumerate(kv.layers):
            for h, held in enumerate(kv.layout.positions[i]):
                kept_from = int(np.searchsorted(held, redo))  # held is sorted: the rest is kept
                part = layer[:, h, kept_from : held.size].to(dtype)
                keys = rotate_keys(part[0], offset, passage.layer_freqs[i])
                pos[i][h].append(held[kept_from:] + offset)
                ent[i][h].append(torch.stack([keys, part[1]]))
        ids.extend(passage.token_ids)
    total = len(ids)
    kv = _layered(pos, ent, total)
    if redo_ids:
        kv = km.insert_at(kv, redo_ids, redo_positions)
    window = km.sliding_window
    if recompute_window and window is not None:
        start = max(len(prefix_ids), total - (window - 1))  # the prefix is its own prefill already
        if start < total:
            fresh = km.insert_at(kv.subset(_where(kv.layout, lambda i, p: p < start)), ids[start:],
                                 range(start, total))
            sliding = [w is not None for w in km.layer_windows()]
            layers = [f if s else k for f, k, s in zip(fresh.layers, kv.layers, sliding)]
            positions = [f if s else k for f, k, s in
                         zip(fresh.layout.positions, kv.layout.positions, sliding)]
            kv = LayeredKV(layers, PositionLayout(positions, total))
    # what each sliding layer keeps of the assembled context: its last window - 1 positions
    kept = km.kept_positions(total)
    if all(k >= total for k in kept):
        return ids, kv
    return ids, kv.subset(_where(kv.layout, lambda i, p: p >= total - kept[i]))


def _where(layout: PositionLayout, test) -> list[np.ndarray]:  # noqa: ANN001 - (layer, positions) -> bool array
    """Per layer, the ``[heads, width]`` mask :meth:`LayeredKV.subset` takes: the slots whose
    positions pass ``test(layer, positions)`` (padding never)."""
    return [np.stack([np.pad(test(i, p), (0, layout.layer_width(i) - p.size)) for p in heads])
            for i, heads in enumerate(layout.positions)]


def _layered(pos: list[list[list[np.ndarray]]], ent: list[list[list[torch.Tensor]]], total: int) -> LayeredKV:
    """A :class:`LayeredKV` from each (layer, head)'s runs of positions and entries, in
    order, each run copied once into its layer's array."""
    positions, layers = [], []
    for heads_pos, heads_ent in zip(pos, ent):
        p = [np.concatenate(runs) if runs else np.zeros(0, np.int64) for runs in heads_pos]
        like = next(run for runs in heads_ent for run in runs)
        out = like.new_empty((2, len(p), max(x.size for x in p), like.shape[-1]))
        for h, runs in enumerate(heads_ent):
            at = 0
            for run in runs:
                out[:, h, at : at + run.shape[1]] = run
                at += run.shape[1]
            out[:, h, at:] = 0
        positions.append(p)
        layers.append(out)
    return LayeredKV(layers, PositionLayout(positions, total))
