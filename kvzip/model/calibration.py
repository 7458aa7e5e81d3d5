"""What calibration needs from a model beyond its cache: queries and output projections.

A key error matters only along the directions queries take (the score is
``q . k``), a value error only through the output projection.  These helpers
read both from a running model so :mod:`kvzip.levels.calibrate` can weigh quantisation
error where it changes the model's output.

Queries are captured at ``q_proj`` (after ``q_norm`` where the model has one)
and reduced to the energy of each RoPE channel pair, ``E[q_i^2 + q_{i+D/2}^2]``:
RoPE rotates each pair, so that energy is the same before and after rotation,
whatever the positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvzip.errors import UnsupportedModelError
from kvzip.formats import LayeredKV
from kvzip.model.session import KVModel


@dataclass
class AttentionStats:
    """One text's cache and the query statistics gathered while computing it."""

    kv: LayeredKV  # float32 numpy per layer [2, H, n, D], keys after RoPE (as cached)
    query_pair_energy: np.ndarray  # [L, H, D/2] float64: sum over tokens and the head's query group
    tokens: int


def _attention_modules(km: KVModel) -> list[torch.nn.Module]:
    layers = getattr(getattr(km.model, "model", None), "layers", None)
    if layers is None or len(layers) != km.num_layers:
        raise UnsupportedModelError(f"{km.name}: cannot find its decoder layers for calibration")
    mods = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "o_proj"):
            raise UnsupportedModelError(f"{km.name}: layer {i} has no q_proj/o_proj attention")
        mods.append(attn)
    return mods


def _query_heads(km: KVModel) -> int:
    n = int(getattr(km.text_config, "num_attention_heads", 0) or 0)
    if n <= 0 or n % km.kv_heads:
        raise UnsupportedModelError(f"{km.name}: {n} query heads do not group over {km.kv_heads} kv heads")
    return n


@torch.inference_mode()
def capture(km: KVModel, ids: Sequence[int]) -> AttentionStats:
    """Prefill ``ids`` and collect per-layer query channel-pair energies on the way."""
    mods = _attention_modules(km)
    nq, hk, d = _query_heads(km), km.kv_heads, km.head_dim
    energy = np.zeros((km.num_layers, hk, d // 2), np.float64)
    handles = []

    def hook_for(i: int, attn: torch.nn.Module):
        def hook(_mod, _inp, out):
            q = out.float().reshape(out.shape[0], out.shape[1], nq, d)
            norm = getattr(attn, "q_norm", None)
            if norm is not None:
                q = norm(q.to(out.dtype)).float()
            e = q.square()
            e = (e[..., : d // 2] + e[..., d // 2 :]).sum(dim=(0, 1))  # [nq, D/2]
            energy[i] += e.reshape(hk, nq // hk, d // 2).sum(1).double().cpu().numpy()

        return hook

    for i, attn in enumerate(mods):
        handles.append(attn.q_proj.register_forward_hook(hook_for(i, attn)))
    try:
        kv = km.prefill(ids)
    finally:
        for h in handles:
            h.remove()
    return AttentionStats(kv.map(lambda t: t.float().numpy()), energy, len(ids))


@torch.inference_mode()
def output_gram(km: KVModel) -> np.ndarray:
    """Per layer and kv head, ``sum_q W_o[:, q]^T W_o[:, q]`` over the head's query group: [L, H, D, D].

    A value error ``e`` in kv head ``h`` reaches the layer's output as
    ``W_o[:, q] (a . e)`` for every query head ``q`` reading ``h``, so its cost is
    ``e^T G e`` with this ``G``.
    """
    nq, hk, d = _query_heads(km), km.kv_heads, km.head_dim
    out = np.zeros((km.num_layers, hk, d, d), np.float64)
    for i, attn in enumerate(_attention_modules(km)):
        w = attn.o_proj.weight.detach().double()  # [hidden, nq * d]
        if w.shape[1] != nq * d:
            raise UnsupportedModelError(f"{km.name}: o_proj of layer {i} has shape {tuple(w.shape)}")
        w = w.reshape(w.shape[0], nq, d)
        for q in range(nq):
            out[i, q // (nq // hk)] += (w[:, q].T @ w[:, q]).cpu().numpy()
    return out
