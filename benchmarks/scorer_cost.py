"""What each importance scorer costs against a plain prefill of the same tokens.

    PYTHONPATH=. python benchmarks/scorer_cost.py [--model M] [--tokens 2048] [--threads 1] TEXT...

Per text: the best of ``--repeat`` runs of a plain prefill and of each scorer (its prefill
included), on ``--threads`` torch threads; prints seconds and the ratio to the prefill.
Take it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvzip import importance as imp  # noqa: E402
from kvzip.model import KVModel  # noqa: E402


def best(fn, repeat: int, *args) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--scorers", default=",".join(imp.SCORERS))
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    km = KVModel.load(opts.model)
    rows = []
    for path in opts.texts:
        ids = km.encode_text(Path(path).read_text(), special_tokens=True)[: opts.tokens]
        km.prefill(ids[:64])  # warm up
        plain = best(km.prefill, opts.repeat, ids)
        row = {"text": Path(path).name, "tokens": len(ids), "prefill_s": round(plain, 3)}
        for name in opts.scorers.split(","):
            t = best(imp.score, opts.repeat, km, ids, name)
            row[f"score_{name}_s"] = round(t, 3)
            row[f"score_{name}_x"] = round(t / plain, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
