"""The last stages of decoding as torch operations on the model's device.

Entropy decoding runs on the CPU (kvzip's rANS coder); what follows it for the calibrated
levels (``kvzip-profile``) is arithmetic on the whole chunk: symbols times steps, the
profile's inverse basis (a batched matrix product per layer) plus its mean, and RoPE on the
keys.  On an accelerator those run where the cache is going, so the host ships the int32
symbols once and the small step arrays (``decode_on_device``); on the CPU the numpy path
is kept (``benchmarks/decode_device.py`` measures both there: see docs/benchmarks.md).

The codecs package stays free of torch; this module reads the codec's parts (its
quantizer, basis and RoPE tables) and reproduces its decode, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvzip.codecs import ChunkContext, Codec
from kvzip.codecs.kvzip_profile import KvzipProfileCodec
from kvzip.codecs.transforms import rope_cos_sin
from kvzip.model.device import pinned

# (id of a profile array, device) -> (the array, its copy there); holding the array keeps
# its id from being reused by another while the entry lives.
_CACHE: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}


def supports(codec: Codec) -> bool:
    """Whether ``codec``'s decode has a device form here."""
    return isinstance(codec, KvzipProfileCodec)


def _on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A profile's array (basis, mean) on ``device``, copied there once."""
    key = (id(array), str(device))
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not array:
        if len(_CACHE) > 256:
            _CACHE.clear()
        hit = _CACHE[key] = (array, _ship(array, device))
    return hit[1]


def decode_on_device(codec: Codec, payload: bytes, ctx: ChunkContext, device: str | torch.device) -> torch.Tensor:
    """One chunk (``[2, L, H, T, D]`` float32 on ``device``) decoded by ``codec``: the
    entropy decoding on the CPU; dequantizing, basis and RoPE on ``device``."""
    if not supports(codec):
        raise ValueError(f"{type(codec).__name__} has no device decode")
    device = torch.device(device)
    codec.check_chunk(ctx)
    pipeline = codec.pipeline
    r = _dequantize_rows(pipeline.quantizer.row_factors(pipeline.decode_blocks(payload, ctx), ctx), device)
    basis = codec.basis.part(ctx)
    two, layers, heads, dim, tokens = r.shape
    y = r.reshape(two, layers, basis.groups, 1, basis.width, tokens).transpose(-1, -2)
    out = torch.matmul(y, _on(basis.inv_heads, device)).reshape(two, layers, heads, tokens, dim)
    out += _on(basis.mean_heads, device)
    if ctx.rope_inv_freq is not None:
        cos, sin = rope_cos_sin(ctx)
        c, s = torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)
        h = dim // 2
        a, b = out[0, ..., :h].clone(), out[0, ..., h:].clone()
        out[0, ..., :h] = a * c - b * s
        out[0, ..., h:] = b * c + a * s
    return out


def _ship(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` (through pinned memory to a CUDA device)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return (pinned(t) if device.type == "cuda" else t).to(device)


def _dequantize_rows(rows: Any, device: torch.device) -> torch.Tensor:
    """The quantiser's products (:meth:`UniformStepQuantizer.dequantize_rows`) on
    ``device``: the int32 symbols cross once, the steps are small."""
    layers, heads, dim, tokens, ns = rows.shape
    out = torch.empty((2, layers, heads, dim, tokens), dtype=torch.float32, device=device)
    main = _ship(rows.main, device)
    out[0, ..., ns:] = main[0].to(torch.float32) * _ship(rows.key_steps[0], device)
    out[1, ..., ns:] = main[1].to(torch.float32) * _ship(rows.value_steps[0], device)
    if ns:
        sinks = _ship(rows.sinks, device).to(torch.float32)
        out[0, ..., :ns] = sinks[0] * _ship(rows.key_steps[1], device)
        out[1, ..., :ns] = sinks[1] * _ship(rows.value_steps[1], device)
    return out


def decode_chunk_on_device(file: Any, entry: Any, device: torch.device) -> torch.Tensor:
    """A dense file's chunk ``entry`` decoded on ``device`` (see :func:`decode_on_device`)."""
    codecs = file.codecs
    codecs.check_chunk_memory(entry)
    return decode_on_device(codecs.codec(entry.level), file.read_payload(entry), codecs.context(entry), device)


def decode_parts_on_device(file: Any, entry: Any, device: torch.device) -> Iterator[tuple[int, Any, slice, torch.Tensor]]:
    """A 2.x chunk (a file whose layers or heads hold different positions) decoded block
    by block on ``device``: ``(layer, heads, slots, kv)`` for each layer of each block,
    ``heads`` a slice of the layer's heads (``kv`` ``[2, heads, n, D]``) or one head (``kv``
    ``[2, n, D]``, a layer whose heads hold different positions), ``slots`` where its
    entries go among the layer's (head's) own, as :meth:`KVModel.fill_cache` takes them."""
    codecs = file.codecs
    codecs.check_chunk_memory(entry)
    layout = file.header.layout
    codec = codecs.codec(entry.level)
    for block, ctx, part in codecs.block_payloads(entry, file.read_payload(entry)):
        kv = decode_on_device(codec, part, ctx, device)  # [2, layers, heads, n, D]
        first = int(block.positions[0]) if block.count else 0
        for j, layer in enumerate(block.layers):
            if layout.heads_share(layer) and len(block.heads) == layout.kv_heads:
                at = layout.slot(layer, 0, first)
                yield layer, slice(None), slice(at, at + block.count), kv[:, j]
                continue
            for k, head in enumerate(block.heads):
                at = layout.slot(layer, head, first)
                yield layer, head, slice(at, at + block.count), kv[:, j, k]
