"""Dropping entries by importance (``kvzip encode --keep F``): which entries a file keeps.

Every stored (layer, kv head, position) entry has a score (:mod:`kvzip.importance`);
``--keep F`` keeps the fraction ``F`` of them, always including the attention sinks (the
first ``sink_tokens`` positions) and the context's last position (which a prompt-less
generation reads again).  Two budget rules:

* ``shared`` (the default): one budget across every head and layer.  Each (layer, head)'s
  scores are shifted to a minimum of 0 and divided by their mean, and the entries with the
  largest such shares are kept wherever they are, so a head whose attention is spread out
  keeps more entries than one that looks at a few (the rule of AdaKV, Feng et al., 2024,
  taken across layers as well as heads), and a layer holding few entries (a sliding
  window) does not outweigh one holding many.
* ``head``: every (layer, head) keeps the same fraction of its entries (SnapKV-style).

When a level's codec maps a layer's heads jointly (a ``pca-layer`` calibration profile
with more than one kv head), the heads of a layer must hold the same positions; the
selection then runs per layer, on the largest share any of its heads gives a position
(``heads: "layer"`` in the header's record).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvzip.errors import InputError
from kvzip.formats import PositionLayout

KEEP_RULES = ("shared", "head")
DEFAULT_KEEP_RULE = "shared"
# The scorer --keep drops by when none is named: the best of the three at dropping on the
# default (instruct) model; on a base model prefill attention dropped better
# (docs/benchmarks.md, "Dropping entries").
DEFAULT_KEEP_SCORER = "reconstruct"
SINK_TOKENS = 4


def check_keep(fraction: float | None, rule: str) -> None:
    """Refuse a fraction outside (0, 1] or an unknown rule, before any work."""
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise InputError(f"--keep must be a fraction in (0, 1], got {fraction!r}")
    if rule not in KEEP_RULES:
        raise InputError(f"--keep-rule must be one of {', '.join(KEEP_RULES)}, got {rule!r}")


def check_keep_by(keep_by: str | None, importance: str | None) -> str:
    """The scorer a file's entries are scored with: ``--keep-by``, else ``--importance``'s,
    else :data:`DEFAULT_KEEP_SCORER` (one scoring pass serves both, so two different
    names are refused)."""
    if keep_by is not None and importance is not None and keep_by != importance:
        raise InputError(f"--keep-by {keep_by} and --importance {importance} must name the same scorer "
                         "(one scoring pass serves both)")
    from kvzip.importance import scorer  # the package's scorers (imported late: it imports this module)

    return scorer(keep_by or importance or DEFAULT_KEEP_SCORER).name


def _shares(layer_scores: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per head, its scores over its held entries relative to their mean, after a shift to
    a minimum of 0 (padding: -1)."""
    out = np.full(layer_scores.shape, -1.0)
    for h, n in enumerate(counts):
        s = np.asarray(layer_scores[h, :n], np.float64)
        if not n:
            continue
        s = s - s.min()
        total = s.sum()
        out[h, :n] = s * (n / total) if total > 0 else 1.0
    return out


def choose(scores: Sequence[np.ndarray], layout: PositionLayout, fraction: float, rule: str = DEFAULT_KEEP_RULE,
           *, heads_together: bool = False, sink_tokens: int = SINK_TOKENS) -> list[np.ndarray]:
    """Per layer ``[heads, width]`` bool over the layer's slots: the entries kept.

    ``scores``: per layer ``[heads, width]``, aligned with the cache's slots (those past a
    head's count are padding and never kept).  ``heads_together``: a layer's heads keep the
    same positions (see the module's doc)."""
    check_keep(fraction, rule)
    t = layout.token_count
    counts = [[int(p.size) for p in heads] for heads in layout.positions]
    shares = [_shares(np.asarray(s), c) for s, c in zip(scores, counts)]
    forced = []
    for heads in layout.positions:
        width = max(p.size for p in heads)
        f = np.zeros((len(heads), width), bool)
        for h, p in enumerate(heads):
            f[h, : p.size] = (p < sink_tokens) | (p == t - 1)
        forced.append(f)
    if heads_together:  # one row per layer: the largest share any head gives a slot
        for i, heads in enumerate(layout.positions):
            if any(not np.array_equal(p, heads[0]) for p in heads[1:]):
                raise InputError(f"layer {i}'s heads hold different positions; they cannot be kept together")
        shares = [s.max(axis=0, keepdims=True) for s in shares]
        forced = [f.any(axis=0, keepdims=True) for f in forced]
        counts = [c[:1] for c in counts]
    kept = [f.copy() for f in forced]
    if rule == "head":
        for s, k, c in zip(shares, kept, counts):
            for h, n in enumerate(c):
                want = int(np.ceil(fraction * n))
                room = want - int(k[h, :n].sum())
                if room > 0:
                    order = np.argsort(-np.where(k[h, :n], -np.inf, s[h, :n]), kind="stable")
                    k[h, order[:room]] = True
    else:
        total = sum(sum(c) for c in counts)
        room = int(np.ceil(fraction * total)) - sum(int(k.sum()) for k in kept)
        if room > 0:
            flat = np.concatenate([np.where(k | (s < 0), -np.inf, s).ravel() for s, k in zip(shares, kept)])
            best = np.argsort(-flat, kind="stable")[:room]
            best = best[np.isfinite(flat[best])]
            mark = np.zeros(flat.size, bool)
            mark[best] = True
            at = 0
            for k in kept:
                k |= mark[at : at + k.size].reshape(k.shape)
                at += k.size
    if heads_together:
        kept = [np.repeat(k, len(heads), axis=0) for k, heads in zip(kept, layout.positions)]
    return kept


def prune_aligned(per_layer: Sequence[np.ndarray], layout: PositionLayout, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-entry arrays (``[heads, width]`` per layer, e.g. importance classes) kept as
    :meth:`LayeredKV.subset` keeps the cache's entries."""
    out = []
    for arr, mask, held in zip(per_layer, masks, layout.positions):
        idx = [np.flatnonzero(mask[h, : p.size]) for h, p in enumerate(held)]
        width = max(ix.size for ix in idx)
        a = np.zeros((len(held), width), np.asarray(arr).dtype)
        for h, ix in enumerate(idx):
            a[h, : ix.size] = np.asarray(arr)[h, ix]
        out.append(a)
    return out


def header_record(fraction: float, rule: str, scorer: str, heads_together: bool, before: int, after: int) -> dict:
    """What a file's header records of the entries it dropped (``keep``)."""
    return {"fraction": float(fraction), "rule": rule, "scorer": scorer,
            "heads": "layer" if heads_together else "each", "entries_scored": int(before),
            "entries_kept": int(after)}
