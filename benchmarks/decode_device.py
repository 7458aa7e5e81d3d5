"""Decode's last stages (dequantize, inverse basis, RoPE) in numpy against torch, here.

Encodes a real context with the default model at the calibrated ``balanced`` level, then
decodes every chunk with the codec's numpy path (``decode``) and with
``kvzip.levels.device_decode.decode_on_device`` on the CPU (torch), single-threaded and
each best of ``--repeat``; prints both speeds and the largest difference.  On a GPU,
``--device cuda`` measures the same on it.

    python benchmarks/decode_device.py [--device cuda] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvzip import api  # noqa: E402
from kvzip.levels import open_cache  # noqa: E402
from kvzip.levels.device_decode import decode_chunk_on_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    km = api.load_model(device="cpu")
    torch.set_num_threads(1)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = km.encode_text(text, special_tokens=True)[: opts.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.kvz"
        api.encode(km.decode_ids(ids), path, model=km, levels=["balanced"])
        with open_cache(path) as f:
            entries = f.kv_entries("balanced")
            elements = sum(f.codecs.chunk_elements(e) for e in entries)
            best = {"numpy": float("inf"), "torch": float("inf")}
            worst = 0.0
            for _ in range(opts.repeat):
                t0 = time.perf_counter()
                ref = [f.decode_chunk(e) for e in entries]
                best["numpy"] = min(best["numpy"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = [decode_chunk_on_device(f, e, torch.device(opts.device)) for e in entries]
                if opts.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best["torch"] = min(best["torch"], time.perf_counter() - t0)
            for a, b in zip(ref, got):
                worst = max(worst, float(np.abs(a - b.cpu().numpy()).max() / max(np.abs(a).max(), 1e-30)))
    print(f"{len(entries)} chunks, {elements / 1e6:.1f} M elements, one thread:")
    for name, s in best.items():
        print(f"  {name:<6} {s:.3f} s  ({elements / s / 1e6:.0f} M elements/s)")
    print(f"  largest difference, relative to the chunk's largest value: {worst:.1e}")


if __name__ == "__main__":
    main()
