"""Everything kvzip checks on a GPU, in one short command (nothing else needs one).

1. the GPU-only tests (``tests/test_devices.py -k cuda``);
2. for each context length: encode a text's cache on the GPU (bf16 weights, the default
   level), then the first token from the ``.kvz`` (decode into the model's cache on the
   GPU, prompt, first token) against a fresh GPU prefill of the same text;
3. what the streaming controller would choose for that file on links of 10, 100 and
   1,000 Mbit/s with no deadline, from the model's measured prefill speed and the
   file's level sizes (``choose_level``: recompute when it is ready sooner).

    python benchmarks/gpu_check.py --model ~/.cache/kvzip/models/gemma-3-270m-q4_k_m.gguf \\
        --lengths 8192,32768 --json > gpu.json

On a machine without CUDA it says so and exits 0 (the tests skip there too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvzip import api  # noqa: E402
from kvzip.formats import open_kvz  # noqa: E402
from kvzip.levels import attach_kv  # noqa: E402
from kvzip.stream.controller import choose_level  # noqa: E402

TEXTS = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2",
         "/usr/share/common-licenses/GFDL-1.3", "/usr/share/common-licenses/Apache-2.0"]


def _text(km, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        for name in TEXTS:
            if Path(name).is_file():
                ids += km.encode_text(Path(name).read_text(), special_tokens=False)
    return ids[:n_tokens]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--level", default="balanced")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same steps, to check the script")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    if opts.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU paths are in make test)")
        return
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_devices.py"),
                            "-k", "cuda"], cwd=ROOT, capture_output=True, text=True)
    km = api.load_model(opts.model, device=opts.device)
    rate = km.prefill_rate()
    report = {"device": torch.cuda.get_device_name() if opts.device != "cpu" else "cpu", "model": km.name, "model_dtype": km.dtype,
              "tests": tests.stdout.strip().splitlines()[-1:], "tests_rc": tests.returncode,
              "prefill_tokens_per_second": rate, "rows": []}
    prompt = km.encode_text(" What is this text about?", special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in opts.lengths.split(",")):
            if n + len(prompt) + 1 > km.max_context:
                report["rows"].append({"tokens": n, "skipped": f"beyond the model's context of {km.max_context}"})
                continue
            ids = _text(km, n)
            path = Path(tmp) / f"ctx{n}.kvz"
            text = km.decode_ids(ids)
            t0 = time.perf_counter()
            summary = api.encode(text, path, model=km, levels=[opts.level], if_no_profile="uncalibrated")
            encode_s = time.perf_counter() - t0
            with open_kvz(path) as reader:
                doc = reader.token_ids().tolist()
                sizes = [{opts.level: e.length} for e in reader.kv_entries(opts.level)]
                counts = [e.token_count for e in reader.kv_entries(opts.level)]
            timings = []
            for _ in range(2):  # the first round warms both paths up; the second is reported
                _sync()
                t0 = time.perf_counter()
                attached = attach_kv(path, km, room=len(prompt) + 1)
                first = km.generate(doc + prompt, cache=attached.cache, max_new_tokens=1)
                _sync()
                from_kvz = time.perf_counter() - t0
                del attached
                t0 = time.perf_counter()
                again = km.generate(doc + prompt, max_new_tokens=1)
                _sync()
                timings.append((from_kvz, time.perf_counter() - t0))
            from_kvz, fresh = timings[-1]
            choices = {}
            for mbps in (10, 100, 1000):
                d = choose_level(sizes, [opts.level], mbps * 1e6 / 8, float("inf"), sum(counts) / rate)
                choices[f"{mbps} Mbit/s"] = "recompute" if d.recompute else d.level
            report["rows"].append({
                "tokens": n, "file_bytes": summary.file_bytes, "encode_seconds": round(encode_s, 3),
                "first_token_from_kvz_seconds": round(from_kvz, 4),
                "first_token_fresh_prefill_seconds": round(fresh, 4),
                "same_first_token": first == again, "controller": choices,
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if opts.device != "cpu" else None,
            })
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['device']}, {report['model']} ({report['model_dtype']}), "
          f"prefill {rate:,.0f} tokens/s; tests: {report['tests']}")
    for r in report["rows"]:
        if "skipped" in r:
            print(f"  {r['tokens']:>6} tokens: skipped ({r['skipped']})")
            continue
        print(f"  {r['tokens']:>6} tokens: first token {r['first_token_from_kvz_seconds']:.3f} s from the .kvz, "
              f"{r['first_token_fresh_prefill_seconds']:.3f} s from a fresh prefill; controller {r['controller']}")


if __name__ == "__main__":
    main()
