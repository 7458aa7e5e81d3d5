"""Encode/decode speed of lossy codecs on a cached KV (no model needed).

    python benchmarks/codec_speed.py [kv.safetensors]   # default /tmp/kv_gpl3.safetensors

Reports the best of 3 passes over all 256-token chunks, in M K/V elements per second
on one process (the machine is shared, so the best pass is the least disturbed one).
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetensors.numpy import load_file  # noqa: E402

from kvzip.codecs import ChunkContext, codec_from_config  # noqa: E402
from kvzip.levels import LEVELS  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/kv_gpl3.safetensors"
kv = load_file(path)["kv"][:, :, :, :2048]
two, L, H, T, D = kv.shape
inv = tuple((1 / (100000 ** (np.arange(0, D, 2) / D))).tolist())
chunks = [(np.ascontiguousarray(kv[:, :, :, s : s + 256]), ChunkContext(s, 256, L, H, D, "float32", inv))
          for s in range(0, T, 256)]
for name, cfg in [(n, LEVELS[n]) for n in ("high", "balanced", "small")] + [("cachegen", {"id": "cachegen"})]:
    codec = codec_from_config(cfg)
    best_e = best_d = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        payloads = [codec.encode(x, c) for x, c in chunks]
        t1 = time.perf_counter()
        for p, (_x, c) in zip(payloads, chunks):
            codec.decode(p, c)
        t2 = time.perf_counter()
        best_e, best_d = min(best_e, t1 - t0), min(best_d, t2 - t1)
    bits = sum(map(len, payloads)) * 8 / kv.size
    print(f"{name:10s} bits {bits:.3f}  encode {kv.size / best_e / 1e6:5.1f}  decode {kv.size / best_d / 1e6:5.1f} Melem/s")
