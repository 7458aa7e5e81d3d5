"""A cache captured with the weights in one dtype, attached to the model in another.

For each text: prefill the first ``--prefix`` tokens with the model's weights in bfloat16,
store the cache ``lossless`` as bfloat16 (a real ``.kvz``), decode it and teacher-force the
next ``--cont`` tokens with the float32 model; compare the next-token distributions with
the float32 model reading its own float32 cache (KL in nats per token, top-1 agreement).
The ``bf16 model`` column is the bf16 model reading its own cache: what running in bf16
costs by itself.

    python benchmarks/dtype_attach.py            # the embedded default model, 3 texts
    python benchmarks/dtype_attach.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvzip.levels import load_kv, stream_prefill, write_kvz  # noqa: E402
from kvzip.model import KVModel  # noqa: E402

TEXTS = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3",
         "/usr/share/common-licenses/Apache-2.0"]


def _compare(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == test.argmax(-1)).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=384)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    fp32 = KVModel.load(opts.model, device="cpu", dtype="float32")
    bf16 = KVModel.load(opts.model, device="cpu", dtype="bfloat16")
    assert fp32.identity()["fingerprint"] == bf16.identity()["fingerprint"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in TEXTS:
            ids = fp32.encode_text(Path(name).read_text(), special_tokens=True)
            prefix, cont = ids[: opts.prefix], ids[opts.prefix : opts.prefix + opts.cont]
            path = Path(tmp) / "bf16.kvz"
            write_kvz(stream_prefill(bf16, prefix, 256), prefix, path, bf16, levels=["lossless"],
                      chunk_tokens=256, dtype="bfloat16")
            with torch.inference_mode():
                ref = fp32.teacher_force(fp32.prefill(prefix), cont)
                attached = fp32.teacher_force(load_kv(path).kv, cont)
                own = bf16.teacher_force(bf16.prefill(prefix), cont)
            kl, top1 = _compare(ref, attached)
            kl_bf16, top1_bf16 = _compare(ref, own)
            rows.append({"text": Path(name).name, "tokens": len(prefix), "kl_bf16_cache_fp32_model": kl,
                         "top1": top1, "kl_bf16_model": kl_bf16, "top1_bf16_model": top1_bf16})
    if opts.json:
        print(json.dumps({"model": fp32.name, "prefix": opts.prefix, "cont": opts.cont, "rows": rows}, indent=2))
        return
    print(f"{fp32.name}: bf16-captured cache attached to the fp32 model, against fp32 throughout")
    print(f"{'text':<12} {'KL (cache)':>11} {'top-1':>6} {'KL (bf16 model)':>16} {'top-1':>6}")
    for r in rows:
        print(f"{r['text']:<12} {r['kl_bf16_cache_fp32_model']:>11.5f} {r['top1']:>6.3f} "
              f"{r['kl_bf16_model']:>16.5f} {r['top1_bf16_model']:>6.3f}")


if __name__ == "__main__":
    main()
