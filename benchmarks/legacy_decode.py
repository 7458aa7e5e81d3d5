"""Decode time of a file in an older entropy layout (param2, constriction, holds the GIL).

Writes a ``balanced``-like level with ``entropy: param2`` for a SmolLM2-135M-shaped cache
(30 layers, 3 kv heads, head_dim 64) of 8,192 random tokens, then decodes it six times
in this process (the first one with the entropy-model caches emptied).

    .venv/bin/python benchmarks/legacy_decode.py

To compare with another kvzip, write the file once (``--write-only PATH``) and time it
with each build (``--decode-only PATH``, e.g. under ``PYTHONPATH=<other checkout>``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

L, H, D, T = 30, 3, 64, 8192


class _Model:
    """What write_kvz asks of a model, for a cache that no model made."""

    name = "synthetic"
    tokenizer = None

    def identity(self):
        return {"fingerprint": "sha256:" + "0" * 64, "name": self.name}

    def rope_inv_freq(self):
        return tuple((1 / (10000 ** (np.arange(0, D, 2) / D))).tolist())

    def rope_tables(self):
        return (self.rope_inv_freq(),), (0,) * L

    def attention_info(self):
        return None


def write(path: Path) -> None:
    from kvzip.codecs import codec_from_config
    from kvzip.levels import LEVELS, write_kvz

    g = np.random.default_rng(0)
    kv = g.standard_normal((2, L, H, T, D)).astype(np.float32) * np.linspace(0.2, 3, D, dtype=np.float32)
    codec = codec_from_config({**LEVELS["balanced"], "entropy": "param2"})
    write_kvz(torch.from_numpy(kv), list(range(T)), path, _Model(), levels=[("balanced-param2", codec)],
              chunk_tokens=256, dtype="float32")


def decode(path: Path) -> list[float]:
    import kvzip.api as api
    from kvzip.codecs.entropy import clear_model_caches

    times = []
    for i in range(6):
        if i == 0:
            clear_model_caches()
        t = time.perf_counter()
        api.load_kv(path)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-only", type=Path)
    ap.add_argument("--decode-only", type=Path)
    args = ap.parse_args()
    if args.write_only:
        write(args.write_only)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.decode_only or Path(tmp) / "param2.kvz"
        if not args.decode_only:
            write(path)
        times = decode(path)
    n = 2 * L * H * T * D
    print("decode seconds:", " ".join(f"{t:.2f}" for t in times),
          f"(best {n / min(times) / 1e6:.0f} M elements/s)")


if __name__ == "__main__":
    main()
