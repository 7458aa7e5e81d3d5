"""``kvzip-lossy``: kvzip's own lossy codec behind the ``high`` / ``balanced`` /
``small`` levels.

Stages: keys un-rotated to pre-RoPE (optional) -> uniform quantiser with one
bounded-error step per (K/V, layer), relative to that layer's RMS in the chunk
(optionally scaled per key channel / per value token), attention-sink tokens
(absolute positions < ``sink_tokens``) at a ``sink_factor`` times finer step ->
range coding with one small parametric model (generalised Gaussian, a few bytes)
per (K/V, layer, head, channel) row, or empirical tables (``entropy="hist"``);
``entropy="param2"`` codes the same models in a layout that decodes faster, and
``entropy="rans"`` (the default) with kvzip's own C rANS coder, faster still.

Error bound (before re-rotation, which is an orthogonal 2x2 map per channel pair):
``|x - x_hat| <= step / 2`` for every element, ``step = key_step|value_step * RMS``
(times ``2 ** (value_token_exp * c / 4)`` for values, c the token's quarter-octave
RMS code; divided by ``sink_factor`` on sink tokens).

Measured (SmolLM2-135M, P=2048, C=384, 256-token chunks, mean of GPL-3, GPL-2,
GFDL-1.3, argparse.py, typing.py; ``benchmarks/codec_quality.py``)::

    level      bits/elem  KL nats/tok  |dppl|%  top-1
    high         4.03      0.00077      0.17    0.985
    balanced     2.80      0.0051       0.42    0.956
    small        1.87      0.024        1.76    0.922
    cachegen     2.62      0.041        4.03    0.891   (reference, default bins)
    cachegen x2  3.75      0.0080       0.73    0.942   (bins 64/32)

What the knobs bought (3 texts, steps 0.35/0.35 unless said): attention sinks at a
16x finer step cut KL 3.2x (0.034 -> 0.0108) for +0.3% bits; pre-RoPE keys save 6%
bits at equal KL; per-token value steps (exponent 0.5) cut KL 23% for +0.5% bits;
spending the step on keys (keys hurt more than values) beats equal steps; per-channel
key steps (exponent 0.5) and finer early layers did not pay; deltas across tokens
raise entropy (pre-RoPE keys and values alike).
"""

from __future__ import annotations

import numpy as np

from kvzip.codecs.entropy import entropy_layout
from kvzip.codecs.quantize import UniformStepQuantizer, check_importance_factors
from kvzip.codecs.registry import register_codec
from kvzip.codecs.stages import StagedCodec, StagePipeline
from kvzip.codecs.transforms import UnRoPE
from kvzip.errors import CodecError

_FLOAT_PARAMS = ("key_step", "value_step", "key_channel_exp", "value_token_exp", "sink_factor", "early_factor")


@register_codec
class KvzipLossyCodec(StagedCodec):
    codec_id = "kvzip-lossy"

    def __init__(self, key_step: float = 0.1, value_step: float = 0.1, prerope: bool = True,
                 key_channel_exp: float = 0.0, value_token_exp: float = 0.0, sink_tokens: int = 4,
                 sink_factor: float = 16.0, early_layers: int = 0, early_factor: float = 1.0,
                 entropy: str = "param", importance_factors: list[float] | None = None):
        p = dict(key_step=key_step, value_step=value_step, prerope=prerope,
                 key_channel_exp=key_channel_exp, value_token_exp=value_token_exp,
                 sink_tokens=sink_tokens, sink_factor=sink_factor, early_layers=early_layers,
                 early_factor=early_factor, entropy=entropy)
        for k in _FLOAT_PARAMS:
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise CodecError(f"kvzip-lossy {k} must be a finite number, got {v!r}")
        if not (0 < key_step <= 16 and 0 < value_step <= 16):
            raise CodecError("kvzip-lossy steps must lie in (0, 16]")
        if not (1 <= sink_factor <= 4096 and 1 <= early_factor <= 64):
            raise CodecError("kvzip-lossy sink_factor must lie in [1, 4096], early_factor in [1, 64]")
        if not (-2 <= key_channel_exp <= 2 and -2 <= value_token_exp <= 2):
            raise CodecError("kvzip-lossy exponents must lie in [-2, 2]")
        for k in ("sink_tokens", "early_layers"):
            if isinstance(p[k], bool) or not isinstance(p[k], int) or not 0 <= p[k] <= 1 << 20:
                raise CodecError(f"kvzip-lossy {k} must be a non-negative integer")
        coder = entropy_layout(entropy)  # an unknown name is a CodecError naming the known ones
        if not isinstance(prerope, bool):
            raise CodecError("kvzip-lossy prerope must be true or false")
        factors = check_importance_factors(importance_factors, "kvzip-lossy")
        if factors is not None:  # absent from configs that do not use it: their bytes are unchanged
            p["importance_factors"] = factors
        self._p = p
        stages: list[object] = [UnRoPE()] if prerope else []
        stages += [
            UniformStepQuantizer(key_step, value_step, key_channel_exp, value_token_exp,
                                 sink_tokens, sink_factor, early_layers, early_factor,
                                 importance_factors=factors),
            coder,
        ]
        self.pipeline = StagePipeline(stages)


