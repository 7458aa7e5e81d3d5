"""What spending bits by importance is worth: a level uniform against the same level with
each scorer's importance classes, at (about) the same size, on the bench protocol.

    PYTHONPATH=. python benchmarks/importance_gain.py MODEL LEVEL SHARES FACTORS TEXTS
    PYTHONPATH=. python benchmarks/importance_gain.py default balanced "[0.05,0.15,0.3,0.5]" "[0.35,0.6,1,1.8]" \
        GPL-3,GPL-2,GFDL-1.3,argparse.py,typing.py

MODEL: "default" or a --model spec; the level is calibrated (its profile must exist). Prints,
per text, bits per stored element, KL nats per token and top-1 for the uniform level and for
each scorer (SCORERS=... to choose), and the scorer's time (prefill included) against a
plain prefill on the same single thread. The shares and factors above are kvzip's defaults
(``kvzip.codecs.classes.DEFAULT_SHARES`` / ``DEFAULT_FACTORS``); other values try a ladder
without patching the package.
"""
import json
import os
import sys
import sysconfig
import time

import torch

from kvzip import api
from kvzip import importance as imp
from kvzip.bench import score
from kvzip.levels import resolve
from kvzip.model import KVModel

torch.set_num_threads(1)
P, C = 2048, 384
km = KVModel.load(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None)
level = sys.argv[2] if len(sys.argv) > 2 else "balanced"
shares = json.loads(sys.argv[3]) if len(sys.argv) > 3 else list(imp.DEFAULT_SHARES)
factors = json.loads(sys.argv[4]) if len(sys.argv) > 4 else list(imp.DEFAULT_FACTORS)
texts = (sys.argv[5] if len(sys.argv) > 5 else "GPL-3,GPL-2,GFDL-1.3").split(",")
res = resolve([level], km, None, if_missing="error")
OUT = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"importance-gain-{os.getpid()}.kvz")
base = res.codecs[0]
STDLIB = os.environ.get("STDLIB", sysconfig.get_paths()["stdlib"])  # where argparse.py, typing.py come from
paths = {"GPL-3": "/usr/share/common-licenses/GPL-3", "GPL-2": "/usr/share/common-licenses/GPL-2",
         "GFDL-1.3": "/usr/share/common-licenses/GFDL-1.3",
         "argparse.py": f"{STDLIB}/argparse.py", "typing.py": f"{STDLIB}/typing.py"}


def run(kvx, codec, classes, ids, ref, follow, targets):
    """(bits per stored element, KL, top-1) of ``kvx`` through ``codec`` and a real file."""
    api.write_kvz(kvx, ids[:P], OUT, km, levels=[("x", codec)], chunk_tokens=256, dtype="float32",
                  importance=classes)
    bits = os.path.getsize(OUT) * 8 / kvx.elements()
    s = score(ref, km.teacher_force(api.load_kv(OUT).kv, follow), targets)
    return bits, s.kl, s.top1


for name in texts:
    ids = km.encode_text(open(paths[name]).read(), special_tokens=True)[: P + C + 1]
    follow, targets = ids[P:P + C], torch.tensor(ids[P + 1:P + C + 1])
    t0 = time.time()
    kv = km.prefill(ids[:P])
    tp = time.time() - t0
    ref = km.teacher_force(kv, follow)
    b = run(kv, base, None, ids, ref, follow, targets)
    print(name, "uniform", f"{b[0]:.3f} {b[1]:.5f} {b[2]:.3f}", flush=True)
    for scorer in os.environ.get("SCORERS", "keynorm,prefill,reconstruct").split(","):
        t0 = time.time()
        sc = imp.score(km, ids[:P], scorer)
        ts = time.time() - t0
        coded = imp.weighted(base, res.profile, factors)
        cls = imp.classes(sc.scores, shares, heads_together=imp.heads_together(km.kv_heads, [coded]))
        r = run(sc.kv, coded, cls, ids, ref, follow, targets)
        print(name, scorer, f"{r[0]:.3f} {r[1]:.5f} {r[2]:.3f}  cost {ts / tp:.2f}x prefill", flush=True)
os.unlink(OUT)
