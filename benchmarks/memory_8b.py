"""Peak memory of `kvzip encode` and `kvzip generate` at Llama-3-8B's cache geometry.

A random Llama with Llama-3-8B's cache (32 layers, 8 kv heads, head_dim 128, so
131,072 bytes of fp32 K and V per token) but a small hidden size, MLP and byte-level
vocabulary (the cache does not depend on them), is written once to
``~/.cache/kvzip/models/llama3-8b-geometry``.  Each command runs as its own process and
its peak RSS is read from the kernel (``wait4``); the figure that matters is the
increase from a 256-token text to the long one, against the long one's fp32 cache.

    python benchmarks/memory_8b.py                 # 8,192 tokens, level balanced
    python benchmarks/memory_8b.py --tokens 4096 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_DIR = Path.home() / ".cache" / "kvzip" / "models" / "llama3-8b-geometry"
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128


def build_model(directory: Path) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers as tf

    from tests.tiny import byte_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
        num_attention_heads=8, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=32768, rope_theta=500000.0, eos_token_id=256, pad_token_id=256,
        bos_token_id=None,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def peak_rss(args: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, stderr tail) of one kvzip command in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvzip", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"kvzip {' '.join(args)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss * 1024, seconds, err.strip().splitlines()[-1] if err.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--short", type=int, default=256)
    ap.add_argument("--level", default="balanced")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--prefill-cache", default="auto", help="kvzip encode's --prefill-cache")
    ap.add_argument("--importance", default="none",
                    help="kvzip encode's --importance (default none: the chunk-by-chunk path; without a profile "
                         "encode would weigh by prefill attention, which scores the whole cache in memory)")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    model = build_model(MODEL_DIR)
    text = Path(opts.text).read_bytes()
    while len(text) < opts.tokens:
        text += text
    cache_fp32 = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * opts.tokens
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (opts.short, opts.tokens):
            doc = Path(tmp) / f"doc{n}.txt"
            doc.write_bytes(text[: n - 1])  # byte tokens; the template adds none
            kvz = Path(tmp) / f"doc{n}.kvz"
            enc, enc_s, _ = peak_rss(["encode", str(doc), "-m", str(model), "-l", opts.level,
                                      "--if-no-profile", "uncalibrated", "--prefill-cache", opts.prefill_cache,
                                      "--importance", opts.importance,
                                      "-o", str(kvz), "-q"])
            gen, gen_s, _ = peak_rss(["generate", str(kvz), "-m", str(model), "-p", " The end.",
                                      "-n", "4", "-q"])
            rows[n] = {"encode_peak_rss": enc, "encode_seconds": round(enc_s, 2),
                       "generate_peak_rss": gen, "generate_seconds": round(gen_s, 2),
                       "file_bytes": kvz.stat().st_size}
    short, long = rows[opts.short], rows[opts.tokens]
    report = {
        "model": "random Llama, Llama-3-8B cache geometry (32 x 8 x 128), hidden 256",
        "tokens": opts.tokens, "level": opts.level, "prefill_cache": opts.prefill_cache,
        "fp32_cache_bytes": cache_fp32,
        "rows": rows,
        "encode_increase_over_cache": round((long["encode_peak_rss"] - short["encode_peak_rss"]) / cache_fp32, 3),
        "generate_increase_over_cache": round(
            (long["generate_peak_rss"] - short["generate_peak_rss"]) / cache_fp32, 3),
    }
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    mib = 2**20
    print(f"{opts.tokens} tokens, fp32 cache {cache_fp32 / mib:.0f} MiB, level {opts.level}, "
          f"--prefill-cache {opts.prefill_cache}")
    for n, r in rows.items():
        print(f"  {n:>6} tokens: encode peak {r['encode_peak_rss'] / mib:7.0f} MiB ({r['encode_seconds']} s), "
              f"generate peak {r['generate_peak_rss'] / mib:7.0f} MiB ({r['generate_seconds']} s)")
    print(f"  encode: +{report['encode_increase_over_cache']:.0%} of the cache; "
          f"generate: +{report['generate_increase_over_cache']:.0%}")


if __name__ == "__main__":
    main()
