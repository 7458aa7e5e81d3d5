"""``cachegen``: the reference codec, CacheGen (SIGCOMM 2024) as LMCache runs it.

This is the baseline kvzip's own levels must beat at the same size.

* Quantisation: per (K/V, layer, token) absmax across all heads x channels (stored
  as float16), ``C = bins // 2 - 1`` so symbols lie in ``[-C, C]`` (LMCache's
  ``torch_quant``).
* Layer-wise bins, more in early layers (CacheGen's finding that early layers are
  more sensitive).  Defaults follow LMCache's CacheGen config for 32-layer
  models: keys 32 bins for the first 10 layers and 16 after; values 32 bins for
  the first 2 layers and 16 after.  For other depths the same absolute counts
  are used (as LMCache does), capped at the layer count.
* Entropy coding: one empirical probability table per (K/V, layer, channel) per
  chunk (channel = head x head_dim), arithmetic (range) coded with constriction.
  Tables are stored compactly (1/4-octave log counts + zstd) — kinder to the
  baseline than LMCache's raw int16 CDFs, so comparisons measure modelling, not
  table bloat.
* Not done (as in LMCache's released encoder): CacheGen paper's delta-to-anchor
  token grouping; we measured deltas across tokens and they did not reduce entropy.
"""

from __future__ import annotations

from kvzip.codecs.base import ChunkContext
from kvzip.codecs.entropy import entropy_layout
from kvzip.codecs.quantize import TokenAbsmaxQuantizer
from kvzip.codecs.registry import register_codec
from kvzip.codecs.stages import StagedCodec, StagePipeline
from kvzip.errors import CodecError


@register_codec
class CacheGenCodec(StagedCodec):
    codec_id = "cachegen"
    releases_gil = False  # constriction ("hist" tables)

    def __init__(self, key_bins_early: int = 32, key_early_layers: int = 10, key_bins: int = 16,
                 value_bins_early: int = 32, value_early_layers: int = 2, value_bins: int = 16):
        vals = dict(key_bins_early=key_bins_early, key_early_layers=key_early_layers, key_bins=key_bins,
                    value_bins_early=value_bins_early, value_early_layers=value_early_layers,
                    value_bins=value_bins)
        for k, v in vals.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 15:
                raise CodecError(f"cachegen {k} must be a non-negative integer, got {v!r}")
        for k in ("key_bins_early", "key_bins", "value_bins_early", "value_bins"):
            if vals[k] < 4:
                raise CodecError(f"cachegen {k} must be >= 4")
        self._p = vals
        self._pipes: dict[int, StagePipeline] = {}

    def pipeline_for(self, ctx: ChunkContext) -> StagePipeline:
        """One pipeline per model depth (the bins depend on the layer count)."""
        L = ctx.num_layers if ctx.layer_ids is None else max(ctx.layer_ids) + 1  # bins by model layer
        pipe = self._pipes.get(L)
        if pipe is None:
            p = self._p
            kb = [p["key_bins_early"] if i < p["key_early_layers"] else p["key_bins"] for i in range(L)]
            vb = [p["value_bins_early"] if i < p["value_early_layers"] else p["value_bins"] for i in range(L)]
            pipe = StagePipeline([TokenAbsmaxQuantizer(kb, vb), entropy_layout("hist")])
            self._pipes[L] = pipe
        return pipe

