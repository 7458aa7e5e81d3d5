"""A needle in a cached haystack: is one planted sentence still found from a compressed cache?

A sentence stating a passphrase is planted at 5 depths of a long text nobody on the project
wrote (a licence from /usr/share/common-licenses, cut at a paragraph boundary near each
depth); the whole text is encoded as a chat opening with each method, and the model is asked
for the passphrase from the cache.  A depth counts as found when the answer holds the
passphrase.  The uncompressed reference is the ``lossless`` level (the exact cache).

    python benchmarks/needle.py                       # GPL-3, ~3,000 tokens, the default model
    python benchmarks/needle.py --tokens 6000 --json
    python benchmarks/needle.py --methods lossless,"balanced keep 0.5 shared"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from methods import encode_with  # noqa: E402

from kvzip import api  # noqa: E402

NEEDLE = "The secret passphrase for the archive room is BLUE HARBOR FORTY-TWO."
QUESTION = "What is the secret passphrase for the archive room? Answer with the passphrase only."
KEY = "BLUE HARBOR"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
METHODS = {  # name -> (level, importance, keep, keep rule, keep by)
    "lossless": ("lossless", None, None, None, None),
    "balanced": ("balanced", None, None, None, None),
    "balanced + importance prefill": ("balanced", "prefill", None, None, None),
    "balanced + importance reconstruct": ("balanced", "reconstruct", None, None, None),
    # dropping only (--importance none): the rows measured before --keep weighed what it kept
    "balanced keep 0.5 shared": ("balanced", "none", 0.5, "shared", "reconstruct"),
    "balanced keep 0.5 head": ("balanced", "none", 0.5, "head", "reconstruct"),
    "balanced keep 0.5 shared by prefill": ("balanced", "none", 0.5, "shared", "prefill"),
    "balanced keep 0.3 shared": ("balanced", "none", 0.3, "shared", "reconstruct"),
    # what `kvzip encode --keep F` writes: the kept entries weighed by the same scores
    "balanced keep 0.5 shared +weighed": ("balanced", None, 0.5, "shared", "reconstruct"),
    "balanced keep 0.3 shared +weighed": ("balanced", None, 0.3, "shared", "reconstruct"),
}


def haystack(km, path: str, tokens: int, depth: float) -> str:
    """The text's first ~``tokens`` tokens with the needle at a paragraph break near ``depth``."""
    text = Path(path).read_text()
    ids = km.encode_text(text, special_tokens=False)[:tokens]
    text = km.decode_ids(ids)
    at = int(len(text) * depth)
    brk = text.rfind("\n\n", 0, at)
    at = brk + 2 if brk > 0 else at
    return text[:at] + NEEDLE + "\n\n" + text[at:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--methods", default=None, help="comma-separated names of METHODS (default: all)")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    methods = {n: METHODS[n] for n in opts.methods.split(",")} if opts.methods else METHODS
    km = api.load_model(opts.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in DEPTHS:
            doc = haystack(km, opts.text, opts.tokens, depth)
            for name, method in methods.items():
                out = Path(tmp) / "n.kvz"
                summary, encode_s, bits = encode_with(km, doc, out, method)
                result = api.generate(out, QUESTION, model=km, max_new_tokens=16)
                rows.append({
                    "depth": depth, "method": name, "tokens": summary.tokens,
                    "bits_per_context_element": round(bits, 3),
                    "answer": result.text.strip(), "found": KEY.lower() in result.text.lower(),
                    "encode_seconds": round(encode_s, 2),
                })
                print(f"depth {depth:.1f} {name:<30} found={rows[-1]['found']!s:<5} "
                      f"{rows[-1]['bits_per_context_element']:.3f} bits  {rows[-1]['answer'][:60]!r}",
                      file=sys.stderr, flush=True)
    summary_rows = {name: sum(r["found"] for r in rows if r["method"] == name) for name in methods}
    if opts.json:
        print(json.dumps({"model": km.name, "text": opts.text, "needle": NEEDLE, "question": QUESTION,
                          "found_of_5": summary_rows, "rows": rows}, indent=2))
        return
    for name, found in summary_rows.items():
        print(f"{name:<30} found at {found} of {len(DEPTHS)} depths")


if __name__ == "__main__":
    main()
