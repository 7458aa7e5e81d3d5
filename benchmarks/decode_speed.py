"""Decode (and encode) speed of the lossy levels, file -> tensor, on one thread and on all CPUs.

    PYTHONPATH=. python benchmarks/decode_speed.py [--tokens 2048,4096,8000] [--levels high,balanced,small]
                                                   [--repeat 3] [--kv /tmp/kv_gpl3.safetensors]
                                                   [--codec JSON]... [--modes 1p,Np] [--cold]

KV of SmolLM2-135M geometry ([2, 30, 3, T, 64] float32) comes from a real captured
cache (key "kv", 2048 tokens), tiled along tokens with the keys re-rotated to their
new positions, so its statistics are realistic at any length.  For each length and
level it writes a ``.kvz`` (256-token chunks) and reports, as medians of ``--repeat``
runs, in M K/V elements per second:

* encode: ``--encoders`` processes (the codecs alone, as ``write_kvz`` runs them);
* decode 1p: ``open_kvz`` + ``decode_level(decoders=1)`` + ``torch.from_numpy``;
* decode Np: the same with the default number of decoders (all CPUs);
* peak MB: the most memory the decode held at once (private memory of this process
  and its decode workers, sampled every 5 ms, plus the shared output buffer),
  beside the decoded cache's size in float32.

``--codec JSON`` (repeatable) adds a codec config beside the levels, e.g.
``--codec '{"name": "high2", "base": "high", "entropy": "param2"}'``: ``base`` starts
from that level's config, ``name`` labels the row.  All files of one length are
written first, then decoded round-robin (config after config, ``--repeat`` rounds),
so a busy machine slows every config alike.  The entropy coder caches its models
per process and encoding fills that cache; ``--cold`` empties it before every
decode, as a fresh process would find it.

The machine may be shared: compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def realistic_kv(path: str, tokens: int) -> tuple[np.ndarray, tuple[float, ...]]:
    from safetensors.numpy import load_file

    from kvzip.codecs.base import ChunkContext
    from kvzip.codecs.transforms import rope_cos_sin, rotate

    src = load_file(path)["kv"]
    _, layers, heads, n, dim = src.shape
    inv = tuple((1 / (100000 ** (np.arange(0, dim, 2) / dim))).tolist())
    cos0, sin0 = rope_cos_sin(ChunkContext(0, n, layers, heads, dim, "float32", inv))
    pre = rotate(src[0], cos0, sin0, -1.0)
    out = np.empty((2, layers, heads, tokens, dim), np.float32)
    for start in range(0, tokens, n):
        m = min(n, tokens - start)
        cos, sin = rope_cos_sin(ChunkContext(start, m, layers, heads, dim, "float32", inv))
        out[0, :, :, start : start + m] = rotate(np.ascontiguousarray(pre[:, :, :m]), cos, sin, +1.0)
        out[1, :, :, start : start + m] = src[1, :, :, :m]
    return out, inv


def write_file(kv: np.ndarray, inv, level: str, path: Path, chunk: int = 256, config: dict | None = None,
               encoders: int = 1) -> float:
    """Write a one-level .kvz; returns the encode time (codecs only, on ``encoders`` threads
    as ``write_kvz`` runs them)."""
    from kvzip.codecs import ChunkContext, codec_from_config
    from kvzip.formats import KvzWriter
    from kvzip.levels import LEVELS, encode_chunks, find_profile

    _, layers, heads, tokens, dim = kv.shape
    config = config if config is not None else LEVELS[level]
    codec = codec_from_config(config, find_profile(config["profile"]) if "profile" in config else None)
    # a calibrated codec's profile is bound to the model that made it
    profile = getattr(codec, "profile", None)
    fingerprint = profile.model_fingerprint if profile is not None else "sha256:bench"
    header = {
        "format": "kvz", "model": {"fingerprint": fingerprint, "name": "SmolLM2-135M-geometry"},
        "num_layers": layers, "kv_heads": heads, "head_dim": dim, "dtype": "float32",
        "token_count": tokens, "chunk_tokens": chunk, "rope": {"inv_freq": list(inv)}, "chat": None,
        "levels": [{"name": level, "codec": codec.config()}],
    }
    ranges = [(start, min(chunk, tokens - start)) for start in range(0, tokens, chunk)]
    ctx = ChunkContext(0, 0, layers, heads, dim, "float32", tuple(inv))
    with KvzWriter(path, header) as writer:
        t0 = time.perf_counter()
        payloads = encode_chunks(kv, [codec], ranges, ctx, encoders)
        spent = time.perf_counter() - t0
        for i, ((start, n), (payload,)) in enumerate(zip(ranges, payloads)):
            writer.add_kv(i, 0, start, n, payload)
        writer.set_token_ids(np.zeros(tokens, np.int64))
        writer.commit()
    return spent


def _private_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak private memory of this process while running (decoders are its threads)."""

    def __enter__(self):
        self.pids = lambda: [os.getpid()]
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, sum(_private_kib(p) for p in self.pids()))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def decode_once(path: Path, level: str, decoders: int | None, cold: bool = False):
    import torch

    from kvzip.codecs.entropy import clear_model_caches
    from kvzip.levels import open_cache

    if cold:
        clear_model_caches()
    base = sum(_private_kib(p) for p in [os.getpid()])
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with open_cache(path) as reader:
            array = reader.decode_level(level, decoders=decoders)
        tensor = torch.from_numpy(array)
        seconds = time.perf_counter() - t0
    shared = tensor.numel() * tensor.element_size() if not array.flags.owndata and array.base is not None else 0
    peak_mb = (mem.peak - base) / 1024 + shared / 2**20
    return seconds, peak_mb, tensor


def configs_from_args(levels: str, codecs: list[str]) -> dict[str, dict]:
    """name -> codec config: the named levels, then each --codec JSON."""
    from kvzip.levels import LEVELS

    out = {level: dict(LEVELS[level]) for level in levels.split(",") if level}
    for i, text in enumerate(codecs):
        cfg = json.loads(text)
        name = str(cfg.pop("name", f"codec{i + 1}"))
        base = cfg.pop("base", None)
        out[name] = {**(dict(LEVELS[base]) if base else {}), **cfg}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,4096,8000")
    ap.add_argument("--levels", default="high,balanced,small")
    ap.add_argument("--codec", action="append", default=[], help="codec config JSON (repeatable)")
    ap.add_argument("--modes", default="1p,Np", help="decode modes: 1p (one thread), Np (all CPUs)")
    ap.add_argument("--cold", action="store_true", help="empty the entropy model cache before each decode")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--encoders", default="1", help="encode threads, comma-separated (one column each)")
    ap.add_argument("--kv", default="/tmp/kv_gpl3.safetensors")
    args = ap.parse_args()
    from kvzip.levels import default_threads

    configs = configs_from_args(args.levels, args.codec)
    modes = [m for m in args.modes.split(",") if m]
    encoders = [int(e) for e in args.encoders.split(",") if e]
    print(f"decoders for 'Np': {default_threads()}  (cpus: {os.cpu_count()})"
          f"{'  cold model cache' if args.cold else ''}")
    enc_cols = " ".join(f"{'enc ' + str(e) + 'p':>7}" for e in encoders)
    print(f"{'tokens':>6} {'level':9} {'bits':>6} {enc_cols} {'dec 1p':>7} {'dec Np':>7} "
          f"{'peak MB 1p':>10} {'peak MB Np':>10} {'fp32 MB':>8}   (M elem/s, medians)")
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            kv, inv = realistic_kv(args.kv, tokens)
            files = {}
            for name, cfg in configs.items():
                path = Path(tmp) / f"{len(files)}-{tokens}.kvz"
                enc = [write_file(kv, inv, name, path, config=cfg, encoders=e) for e in encoders]
                files[name] = (path, enc, path.stat().st_size * 8 / kv.size)
            times = {(name, m): [] for name in configs for m in modes}
            peaks = {(name, m): [] for name in configs for m in modes}
            refs: dict[str, np.ndarray] = {}
            for mode in modes:
                decoders = 1 if mode == "1p" else None
                for _ in range(args.repeat):
                    for name in configs:  # round-robin: load changes hit every config alike
                        s, peak, tensor = decode_once(files[name][0], name, decoders, args.cold)
                        times[name, mode].append(s)
                        peaks[name, mode].append(peak)
                        if name not in refs:
                            refs[name] = tensor.numpy().copy()
                        elif not np.array_equal(tensor.numpy(), refs[name]):
                            raise SystemExit(f"{name}: decodes differ between runs or modes")
                        del tensor
            for name in configs:
                path, enc, bits = files[name]
                speed = {m: kv.size / statistics.median(times[name, m]) / 1e6 for m in modes}
                peak = {m: max(peaks[name, m]) for m in modes}
                enc_txt = " ".join(f"{kv.size / e / 1e6:7.1f}" for e in enc)
                print(f"{tokens:6d} {name:9} {bits:6.3f} {enc_txt} {speed.get('1p', float('nan')):7.1f} "
                      f"{speed.get('Np', float('nan')):7.1f} {peak.get('1p', float('nan')):10.0f} "
                      f"{peak.get('Np', float('nan')):10.0f} {kv.nbytes / 2**20:8.0f}", flush=True)
                path.unlink()
            del kv


if __name__ == "__main__":
    main()
