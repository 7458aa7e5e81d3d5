"""What the answer benchmarks (needle.py, faq_qa.py) encode a document with: a method is
(level, importance scorer, keep fraction, keep rule, keep scorer), None where unused."""

from __future__ import annotations

import time
from pathlib import Path

from kvzip import api

Method = tuple[str, "str | None", "float | None", "str | None", "str | None"]


def encode_with(km, doc: str, out: Path, method: Method) -> tuple[api.EncodeSummary, float, float]:
    """(summary, seconds, bits per context element) of ``doc`` encoded as a chat opening."""
    level, importance, keep, rule, keep_by = method
    t0 = time.perf_counter()
    summary = api.encode(doc, out, model=km, levels=[level], chat=True, importance=importance,
                         keep=keep, keep_rule=rule or "shared", keep_by=keep_by)
    seconds = time.perf_counter() - t0
    elements = 2 * km.num_layers * km.kv_heads * km.head_dim * summary.tokens
    return summary, seconds, summary.file_bytes * 8 / elements
