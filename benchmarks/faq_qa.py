"""Question answering from cached documents: the Python FAQ, its own questions.

Documents and questions nobody on the project wrote: the FAQ pages that ship in Debian's
``python3.11-doc`` (``make qa-data`` fetches and unpacks it when it is not installed).
Each FAQ entry is a question (a section heading ending in "?") and its answer.  Each page
(general, programming, design, library, extending, windows) is cut into documents of whole
entries up to ``--doc-tokens`` tokens (the model's tokenizer), with the rst directives that
are not text (labels, ``.. index::``) removed.  Questions: ``--per-doc`` entries of a
document, spread evenly over it, among those whose answer names a keyword (below); the
pages' first documents first, then their second ones, until ``--questions`` are asked.

Each document is encoded as a chat opening with every method, and each question is asked
from the cache (greedy, 32 new tokens).  Two scores per question, both rule-based:

- *identical*: the 32-token answer equals the uncompressed cache's (``lossless``: the exact
  cache) token for token;
- *answer KL* and *agreement*: the uncompressed cache's answer teacher-forced after the
  question under both caches: the mean KL (nats per token) from the uncompressed cache's
  next-token distribution, and the share of its tokens the compressed cache also ranks
  first (as ``kvzip ask --fidelity`` measures a RAG answer);
- *prefix*: how many of the 32 tokens agree before the first difference;
- *keyword-correct*: the answer contains one of the answer's keywords, case-insensitively.
  Keywords are the terms the FAQ's authors marked up in the first 600 characters of the
  answer (``literals``, :role:`targets` and `link texts <...>`_), of three characters or
  more, that the question does not already contain.

    make qa-data
    python benchmarks/faq_qa.py --json > docs/bench/faq-qa-smollm2-DATE.json
    python benchmarks/faq_qa.py --methods lossless,balanced --questions 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from methods import encode_with  # noqa: E402

from kvzip import api  # noqa: E402
from kvzip.levels import load_kv  # noqa: E402

FAQ_SUBDIR = "usr/share/doc/python3.11/html/_sources/faq"
FAQ_DIRS = (
    Path("/") / FAQ_SUBDIR,
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvzip" / "data" / "python3.11-doc" / FAQ_SUBDIR,
)
PAGES = ("general", "programming", "design", "library", "extending", "windows")
# name -> (level, importance, keep, keep rule, keep by)
METHODS = {
    "lossless": ("lossless", None, None, None, None),
    "high": ("high", None, None, None, None),
    "balanced": ("balanced", None, None, None, None),
    "balanced + importance prefill": ("balanced", "prefill", None, None, None),
    "balanced + importance reconstruct": ("balanced", "reconstruct", None, None, None),
    "balanced + importance keynorm": ("balanced", "keynorm", None, None, None),
    # dropping only (--importance none): the rows measured before --keep weighed what it kept
    "balanced keep 0.5 by reconstruct": ("balanced", "none", 0.5, "shared", "reconstruct"),
    "balanced keep 0.5 by prefill": ("balanced", "none", 0.5, "shared", "prefill"),
    "balanced keep 0.5 by keynorm": ("balanced", "none", 0.5, "shared", "keynorm"),
    # what `kvzip encode --keep 0.5 [--keep-by S]` writes: the kept entries weighed by S
    "balanced keep 0.5 by reconstruct +weighed": ("balanced", None, 0.5, "shared", "reconstruct"),
    "balanced keep 0.5 by prefill +weighed": ("balanced", None, 0.5, "shared", "prefill"),
}
REFERENCE = "lossless"
HEADING = re.compile(r"^(?P<title>\S.*)\n(?P<rule>[-=~^\"'`#*+]{3,})\n", re.M)
MARKUP = re.compile(r"``(?P<lit>[^`]+)``|:[\w:]+:`~?(?P<role>[^`<]+?)(?:\s*<[^>]*>)?`|`(?P<link>[^`<]+?)\s*<[^>]+>`_")
NOT_TEXT = re.compile(r"^\.\. (?:_[^:]+:|index::|only::|contents::|highlight::|sectionauthor::).*(?:\n[ \t]+\S.*)*\n?", re.M)


@dataclass
class Entry:
    question: str
    text: str  # the heading and its answer, as it stands in the document
    keywords: list[str]


def faq_dir() -> Path:
    for d in FAQ_DIRS:
        if (d / "programming.rst.txt").is_file():
            return d
    raise SystemExit("the Python FAQ is not here: run `make qa-data` (Debian's python3.11-doc) first")


def keywords(question: str, answer: str) -> list[str]:
    out = []
    for m in MARKUP.finditer(answer[:600]):
        kind = next(k for k in ("lit", "role", "link") if m.group(k))
        term = " ".join(m.group(kind).split()).rstrip("()").lstrip("!~")
        if kind == "role" and m.group(0).startswith((":ref:", ":doc:", ":term:", ":pep:", ":rfc:")):
            continue  # label names and numbers, not words an answer would say
        if kind == "link" and len(term.split()) > 2:
            continue  # a phrase ("the PSF license page"), not a name
        if 3 <= len(term) <= 30 and term.lower() not in question.lower() and term not in out:
            out.append(term)
    return out


def entries(page: str) -> list[Entry]:
    """A FAQ page's entries, in order: every section whose heading asks a question."""
    text = NOT_TEXT.sub("", page)
    heads = [m for m in HEADING.finditer(text) if len(m.group("rule")) >= len(m.group("title").rstrip())]
    out = []
    for m, nxt in zip(heads, heads[1:] + [None]):
        title = m.group("title").strip()
        if not title.endswith("?"):
            continue
        body = text[m.end(): nxt.start() if nxt else len(text)]
        out.append(Entry(title, text[m.start(): nxt.start() if nxt else len(text)].rstrip() + "\n\n",
                         keywords(title, body)))
    return out


def documents(km, doc_tokens: int, per_doc: int, questions: int, pages=PAGES) -> list[tuple[str, str, list[Entry]]]:
    """(name, document, the entries asked about): each page cut into documents of whole
    entries up to ``doc_tokens``; the pages' first documents, then their second ones, and
    so on, until ``questions`` questions are asked (or the pages run out)."""
    cut: dict[str, list[tuple[str, list[Entry]]]] = {}
    for page in pages:
        cut[page] = []
        doc, held = "", []
        for e in entries((faq_dir() / f"{page}.rst.txt").read_text()):
            if held and len(km.encode_text(doc + e.text, special_tokens=False)) > doc_tokens:
                cut[page].append((doc, held))
                doc, held = "", []
            doc += e.text
            held.append(e)
        if held:
            cut[page].append((doc, held))
    out: list[tuple[str, str, list[Entry]]] = []
    asked_total = 0
    for i in range(max(len(v) for v in cut.values())):
        for page in pages:
            if i >= len(cut[page]) or asked_total >= questions:
                continue
            doc, held = cut[page][i]
            asked = [e for e in held if e.keywords]
            if len(asked) > per_doc:  # spread evenly over the document
                asked = [asked[round(j * (len(asked) - 1) / (per_doc - 1))] for j in range(per_doc)]
            asked = asked[: questions - asked_total]
            if asked:
                out.append((f"{page}#{i + 1}", doc, asked))
                asked_total += len(asked)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument("--per-doc", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ask-prefix", default="", help="text put before every question (e.g. an instruction)")
    ap.add_argument("--methods", default=None, help="comma-separated names of METHODS (default: all)")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    names = opts.methods.split(",") if opts.methods else list(METHODS)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    methods = {n: METHODS[n] for n in names}
    km = api.load_model(opts.model)
    docs = documents(km, opts.doc_tokens, opts.per_doc, opts.questions)
    rows: list[dict] = []
    reference: dict[str, torch.Tensor] = {}  # the uncompressed cache's answer, log-probabilities
    with tempfile.TemporaryDirectory() as tmp:
        for page, doc, asked in docs:
            for name, method in methods.items():
                out = Path(tmp) / "d.kvz"
                summary, encode_s, bits = encode_with(km, doc, out, method)
                kv = load_kv(out).kv
                for e in asked:
                    ask = opts.ask_prefix + e.question
                    result = api.generate(out, ask, model=km, max_new_tokens=opts.new_tokens)
                    ref = next((r for r in rows if r["method"] == REFERENCE and r["question"] == e.question), None)
                    answer = list(result.new_token_ids) if ref is None else ref["answer_ids"]
                    prompt = km.prompt_ids(ask, km.chat_template())
                    logp = torch.log_softmax(km.teacher_force(kv, prompt + answer[:-1])[len(prompt) - 1:].double(), -1)
                    if ref is None:
                        reference[e.question] = logp
                    ref_logp = reference[e.question]
                    answer_kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
                    agree = float((logp.argmax(-1) == ref_logp.argmax(-1)).double().mean())
                    ids = list(result.new_token_ids)
                    rows.append({
                        "page": page, "question": e.question, "keywords": e.keywords, "method": name,
                        "doc_tokens": summary.tokens,
                        "bits_per_context_element": round(bits, 3),
                        "encode_seconds": round(encode_s, 2),
                        "answer": result.text, "answer_ids": list(result.new_token_ids),
                        "identical": ids == answer,
                        "prefix_tokens": next((i for i, (a, b) in enumerate(zip(ids, answer)) if a != b),
                                              min(len(ids), len(answer))),
                        "answer_kl": round(answer_kl, 6), "answer_agreement": round(agree, 4),
                        "keyword_correct": any(k.lower() in result.text.lower() for k in e.keywords),
                    })
                    r = rows[-1]
                    print(f"{page:<12} {name:<34} ident={r['identical']!s:<5} kl={r['answer_kl']:.4f} "
                          f"kw={r['keyword_correct']!s:<5} "
                          f"{r['bits_per_context_element']:.3f}  {e.question[:40]!r} -> {r['answer'][:50]!r}",
                          file=sys.stderr, flush=True)
    summary_rows = {}
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        bits = {r["page"]: r["bits_per_context_element"] for r in mine}
        summary_rows[name] = {
            "questions": len(mine), "identical": sum(r["identical"] for r in mine),
            "keyword_correct": sum(r["keyword_correct"] for r in mine),
            "mean_answer_kl": round(sum(r["answer_kl"] for r in mine) / max(1, len(mine)), 6),
            "mean_answer_agreement": round(sum(r["answer_agreement"] for r in mine) / max(1, len(mine)), 4),
            "mean_prefix_tokens": round(sum(r["prefix_tokens"] for r in mine) / max(1, len(mine)), 2),
            "bits_per_context_element_per_doc": bits,
            "mean_bits_per_context_element": round(sum(bits.values()) / max(1, len(bits)), 3),
        }
    if opts.json:
        print(json.dumps({"model": km.name, "source": str(faq_dir()), "doc_tokens": opts.doc_tokens,
                          "new_tokens": opts.new_tokens,
                          "ask_prefix": opts.ask_prefix, "summary": summary_rows, "rows": rows}, indent=2))
        return
    for name, s in summary_rows.items():
        print(f"{name:<34} identical {s['identical']:>2}/{s['questions']}  keyword-correct "
              f"{s['keyword_correct']:>2}/{s['questions']}  answer KL {s['mean_answer_kl']:.4f}  agreement "
              f"{s['mean_answer_agreement']:.3f}  prefix {s['mean_prefix_tokens']:.1f}  "
              f"{s['mean_bits_per_context_element']:.3f} bits")


if __name__ == "__main__":
    main()
