"""How much attention each cached entry receives, measured inside the model's own forward.

:class:`AttentionRecorder` keeps, per layer, kv head and position, the largest attention
weight any query (of the head's query group) gave that entry while it was recording.  It
is filled by an attention function registered through transformers' attention interface
(``"kvzip-record"``): the eager computation (softmax of scaled scores plus the mask,
attention sinks and soft-capping where the model has them), which exposes the weights
that fused kernels never materialise.  :meth:`KVModel.recording` switches a model to it
for the forwards inside a ``with`` block and back afterwards.

The scorers of :mod:`kvzip.importance` use it: during the prefill (attention received
from the context itself) or during a reconstruction pass (KVzip, Kim et al., NeurIPS
2025: the model re-reads the context after "Repeat the previous context:" from its own
cache; an entry that no query of that pass needs can go).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvzip.formats import LayeredKV

NAME = "kvzip-record"
_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar("kvzip_recorder", default=None)
_SCRATCH: contextvars.ContextVar[Scratch | None] = contextvars.ContextVar("kvzip_scratch", default=None)


class AttentionRecorder:
    """Per layer ``[kv_heads, token_count]`` float32: the most attention each position got
    from one query of its kv head's group (``reduce="max"``), or the mean over the queries
    that could see it (``reduce="mean"``, H2O's accumulated attention made fair to late
    tokens, which fewer queries follow).

    ``record_from`` (a position): only queries at or after it are counted, and only keys
    before ``token_count`` are kept (a reconstruction pass scores the original context,
    not the tokens it appends).  ``start``: the tokens already cached when recording
    begins."""

    def __init__(self, num_layers: int, kv_heads: int, token_count: int, *, start: int = 0,
                 record_from: int = 0, reduce: str = "max"):
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be max or mean, not {reduce!r}")
        self.scores = [np.zeros((kv_heads, token_count), np.float32) for _ in range(num_layers)]
        self._counts = [np.zeros((kv_heads, token_count), np.float32) for _ in range(num_layers)]
        self.token_count = token_count
        self.record_from = record_from
        self.reduce = reduce
        self._seen = [start] * num_layers  # tokens each layer has read so far

    def rewind(self, seen: int) -> None:
        """Every layer has read ``seen`` tokens again (a pass whose cache was put back)."""
        self._seen = [seen] * len(self._seen)

    def result(self) -> list[np.ndarray]:
        """Each layer's ``[kv_heads, token_count]`` scores."""
        if self.reduce == "max":
            return self.scores
        return [s / np.maximum(c, 1) for s, c in zip(self.scores, self._counts)]

    def result_for(self, kv: LayeredKV) -> list[np.ndarray]:
        """:meth:`result` picked at the positions each layer of ``kv`` holds (per layer
        ``[kv_heads, n]``, aligned with the cache's layers; 0 in a shorter head's padding)."""
        out = []
        for i, full in enumerate(self.result()):
            held = kv.layout.layer_positions(i)
            out.append(np.take_along_axis(full, np.maximum(held, 0), axis=1) * (held >= 0))
        return out

    def observe(self, layer: int, weights: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """``weights`` [1, query heads, q, kv]: the attention of the layer's newest ``q``
        queries over its ``kv`` keys, the keys being the last ``kv`` positions read
        (``visible`` [q, kv] bool: which of them each query could see; default: any
        weight above 0)."""
        _, hq, q, kv = weights.shape
        end = self._seen[layer] + q
        self._seen[layer] = end
        first_query = end - q
        skip = max(0, self.record_from - first_query)
        if skip >= q:
            return
        key_start = end - kv
        keep = min(kv, self.token_count - key_start)
        if keep <= 0:
            return
        heads = self.scores[layer].shape[0]
        w = weights[0, :, skip:, :keep]  # one pass over it per reduction, queries first
        lo = max(0, key_start)
        target = self.scores[layer][:, lo : key_start + keep]
        if self.reduce == "max":
            best = w.amax(dim=1).reshape(heads, hq // heads, keep).amax(dim=1)
            np.maximum(target, best.float().cpu().numpy()[:, lo - key_start :], out=target)
            return
        target += w.sum(dim=1).reshape(heads, hq // heads, keep).sum(dim=1).float().cpu().numpy()[:, lo - key_start :]
        seen = (w[0] > 0) if visible is None else visible[skip:, :keep]
        self._counts[layer][:, lo : key_start + keep] += (
            seen.sum(dim=0).float().cpu().numpy()[None, lo - key_start :] * (hq // heads))


class Scratch:
    """Float32 buffers that the recording attention's two largest arrays (the scores and
    the weights, ``[heads, groups * q, n]``) are written into, kept for the forwards of
    one ``recording`` block.  A fresh array that size is memory the kernel must hand over
    and zero page by page at every call: on the CPU that took more than half of the
    scores' product and of the softmax (measured at SmolLM2's reconstruct shapes)."""

    def __init__(self) -> None:
        self._flat: list[torch.Tensor | None] = [None, None]

    def take(self, slot: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        size = math.prod(shape)
        flat = self._flat[slot]
        if flat is None or flat.numel() < size or flat.device != device:
            flat = self._flat[slot] = torch.empty(size, dtype=torch.float32, device=device)
        return flat[:size].view(shape)


def record_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager attention that hands its weights to the active recorder.

    Each kv head's query group is one matrix (``[g * q, D]`` against the head's keys), so
    keys and values are never repeated per query head, and the scores matrix, the largest
    array, is scaled, masked and soft-capped in place."""
    b, hq, q, d = query.shape
    heads, n = key.shape[1], key.shape[-2]
    groups = hq // heads
    scale = scaling if scaling is not None else getattr(module, "scaling", d ** -0.5)
    grouped = (query * scale).reshape(b, heads, groups * q, d)
    scratch = _SCRATCH.get()
    shape = (b, heads, groups * q, n)
    if scratch is not None and grouped.dtype == torch.float32:
        scores = torch.matmul(grouped, key.transpose(-1, -2), out=scratch.take(0, shape, grouped.device))
    else:
        scores = torch.matmul(grouped, key.transpose(-1, -2))
        if scores.dtype != torch.float32:
            scores = scores.float()
    softcap = kwargs.get("softcap")
    if softcap:
        scores.div_(softcap).tanh_().mul_(softcap)
    recorder = _ACTIVE.get()
    visible = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :n]
        scores.view(b, heads, groups, q, n).add_(mask[:, :, None].to(scores.dtype))
        if recorder is not None and recorder.reduce == "mean":  # only the mean counts who saw what
            visible = mask[0, 0] == 0
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # GPT-OSS: a learned logit per head that takes part in the softmax
        sink = sinks.reshape(1, heads, groups, 1, 1).expand(b, heads, groups, q, 1).to(scores.dtype)
        full = torch.cat([scores.view(b, heads, groups, q, n), sink], dim=-1)
        probs = torch.softmax(full, dim=-1)[..., :-1].reshape(b, heads, groups * q, n)
    elif scratch is not None:  # the same kernel as torch.softmax, into the second buffer
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scratch.take(1, shape, scores.device))
    else:
        probs = torch.softmax(scores, dim=-1)
    del scores
    if recorder is not None:
        recorder.observe(module.layer_idx, probs.view(b, hq, q, n), visible)
    out = torch.matmul(probs.to(value.dtype), value)  # [b, heads, groups * q, d]
    return out.view(b, hq, q, d).transpose(1, 2).contiguous(), None


_REGISTERED: set[str] = set()


@contextlib.contextmanager
def attending_with(model: Any, name: str, function: Any, mask_function: Any = None) -> Iterator[None]:
    """Inside the block ``model`` attends with ``function``, registered once through
    transformers' attention interface as ``name`` (with ``mask_function`` as its mask
    builder; without one the mask builders hand over None), and as before afterwards."""
    if name not in _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(name, function)
        if mask_function is not None:
            from transformers.masking_utils import AttentionMaskInterface

            AttentionMaskInterface.register(name, mask_function)
        _REGISTERED.add(name)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def recording(model: Any, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """``model``'s forwards inside the block run :func:`record_attention` into ``recorder``."""
    from transformers.masking_utils import eager_mask

    token, scratch = _ACTIVE.set(recorder), _SCRATCH.set(Scratch())
    try:
        with attending_with(model, NAME, record_attention, eager_mask):
            yield recorder
    finally:
        _SCRATCH.reset(scratch)
        _ACTIVE.reset(token)


def prefill_attention(km: Any, ids: Any) -> tuple[LayeredKV, list[np.ndarray]]:
    """Prefill ``ids`` with ``km`` (a :class:`KVModel`) recording attention: the cache and,
    per layer ``[kv_heads, n]`` aligned with it, the mean attention each entry received
    from the context's own queries that could see it."""
    recorder = AttentionRecorder(km.num_layers, km.kv_heads, len(ids), reduce="mean")
    with recording(km.model, recorder):  # the prefill itself, with its weights recorded
        kv = km.prefill(ids)
    return kv, recorder.result_for(kv)
