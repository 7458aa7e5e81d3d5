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

import torch

from kvzip.errors import InputError
from kvzip.model import KVModel


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: Sequence[float]) -> torch.Tensor:
    """Keys ``[..., T, D]`` after RoPE, moved ``delta`` positions later.

    Follows transformers' ``rotate_half`` convention: dimension i and i + D/2 form
    one pair, rotated by ``position * inv_freq[i]``.  The angle is computed in
    float64 and applied in at least float32, then cast back to the keys' dtype.
    """
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


def move_kv(kv: torch.Tensor, delta: int, inv_freq: Sequence[float]) -> torch.Tensor:
    """A cache ``[2, L, H, T, D]`` moved ``delta`` positions later (keys rotated, values kept)."""
    return torch.stack([rotate_keys(kv[0], delta, inv_freq), kv[1]])


@dataclass
class CachedPassage:
    """A passage's token ids and its cache at positions 0..n-1, with its RoPE frequencies."""

    token_ids: list[int]
    kv: torch.Tensor  # [2, L, H, n, D]
    inv_freq: Sequence[float]


def assemble(
    km: KVModel,
    prefix_ids: Sequence[int],
    passages: Sequence[CachedPassage],
    *,
    blend_fraction: float = 0.0,
) -> tuple[list[int], torch.Tensor]:
    """(context ids, their cache): ``prefix_ids``, freshly prefilled (a few tokens), followed
    by each passage moved to its offset.

    With ``blend_fraction`` F > 0, the first ceil(F·n) tokens of every passage that
    has text before it are recomputed from that text instead of reused.
    """
    if not 0.0 <= blend_fraction <= 1.0:
        raise InputError(f"--blend-recompute must be between 0 and 1, got {blend_fraction}")
    if not passages:
        raise InputError("no passages to assemble")
    ids = list(prefix_ids)
    kv = km.prefill(ids) if ids else None
    for passage in passages:
        offset = len(ids)
        redo = math.ceil(blend_fraction * len(passage.token_ids)) if offset else 0
        if redo:
            kv = km.extend(kv, passage.token_ids[:redo])
        if redo < len(passage.token_ids):
            moved = move_kv(passage.kv[:, :, :, redo:], offset, passage.inv_freq)
            kv = moved if kv is None else torch.cat([kv, moved.to(kv.dtype)], dim=3)
        ids.extend(passage.token_ids)
    return ids, kv
