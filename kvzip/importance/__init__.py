"""How much each cached entry matters, and what kvzip does with it.

A *scorer* gives every stored (layer, kv head, position) entry of a context a number:
higher means later queries are likelier to need it.  Three of them, behind one
interface (:class:`Scorer`), kvzip's own code (the papers are cited, no code copied):

* ``keynorm``: minus the key's L2 norm.  Keys with small norms tend to draw more
  attention (Devoto et al., EMNLP 2024).  Free: it reads the captured keys.
* ``prefill``: the mean attention an entry received from the context's own queries during
  the prefill (H2O's accumulated attention, Zhang et al., NeurIPS 2023, divided by the
  number of queries that could see it so late tokens are not penalised).  No extra pass:
  the prefill itself runs with kvzip's recording attention.
* ``reconstruct``: KVzip (Kim et al., NeurIPS 2025).  After the prefill, the model reads
  "Repeat the previous context:" and the context again from its own cache, in pieces of
  512 tokens, each piece (after the prompt) on its own: it attends to the whole context
  and to itself, and is dropped before the next (KVzip's chunked scoring).  An entry's
  score is the largest attention any query of the pass (in its kv head's query group) gave
  it.  The pass costs about one more prefill, its queries reading the whole context.

:func:`score` runs the prefill with the scorer and returns the cache with its scores;
:func:`classes` turns scores into a few importance classes per layer, the input of the
codecs' ``importance_factors``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvzip.codecs import Codec
from kvzip.codecs.classes import DEFAULT_FACTORS, DEFAULT_SHARES, classes, weighted
from kvzip.codecs.profile import Profile
from kvzip.errors import InputError
from kvzip.formats import LayeredKV
from kvzip.importance import keep as dropping

if TYPE_CHECKING:  # the model (and torch) load when a scorer runs
    from kvzip.model import KVModel

REPEAT_PROMPT = "\n\nRepeat the previous context:\n\n"


@dataclass
class Scored:
    """A prefilled context's cache and each stored entry's score (per layer ``[heads, n]``,
    aligned with the cache's layers), with the seconds the prefill and scoring took in all
    (``kvzip bench`` sets them against a plain prefill's)."""

    kv: LayeredKV
    scores: list[np.ndarray]
    scorer: str
    seconds: float


class Scorer:
    name = ""

    def run(self, km: KVModel, ids: Sequence[int]) -> Scored:
        raise NotImplementedError


class KeyNorm(Scorer):
    name = "keynorm"

    def run(self, km: KVModel, ids: Sequence[int]) -> Scored:
        t0 = time.perf_counter()
        kv = km.prefill(ids)
        scores = [-layer[0].float().norm(dim=-1).numpy() for layer in kv.layers]
        return Scored(kv, scores, self.name, time.perf_counter() - t0)


class PrefillAttention(Scorer):
    name = "prefill"

    def run(self, km: KVModel, ids: Sequence[int]) -> Scored:
        from kvzip.model.attention import prefill_attention

        t0 = time.perf_counter()
        kv, scores = prefill_attention(km, ids)
        return Scored(kv, scores, self.name, time.perf_counter() - t0)


class Reconstruct(Scorer):
    name = "reconstruct"

    def __init__(self, step: int = 512):
        self.step = step

    def run(self, km: KVModel, ids: Sequence[int]) -> Scored:
        t0 = time.perf_counter()
        kv = km.prefill(ids)
        bos = getattr(km.tokenizer, "bos_token_id", None) if km.tokenizer is not None else None
        body = list(ids[1:]) if ids and bos is not None and ids[0] == bos else list(ids)
        prompt = km.encode_text(REPEAT_PROMPT, special_tokens=False)
        pieces = [prompt + body[i : i + self.step] for i in range(0, len(body), self.step)]
        n = len(ids)
        from kvzip.model.attention import AttentionRecorder, recording

        recorder = AttentionRecorder(km.num_layers, km.kv_heads, n, start=n, record_from=n)
        with recording(km.model, recorder):  # piece by piece: attention memory stays bounded
            km.read_pieces_after(kv, pieces, before_each=lambda: recorder.rewind(n))
        return Scored(kv, recorder.result_for(kv), self.name, time.perf_counter() - t0)


SCORERS: dict[str, Scorer] = {s.name: s for s in (KeyNorm(), PrefillAttention(), Reconstruct())}


def scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise InputError(f"unknown importance scorer {name!r} (known: {', '.join(SCORERS)})")
    return SCORERS[name]


# --importance none: uniform precision, even where the model's profile says otherwise
UNIFORM = "none"


def requested(name: str | None) -> str | None:
    """``--importance`` checked before any work: a scorer's name, :data:`UNIFORM`, or None
    (not given: the profile decides, :func:`weighing`)."""
    return name if name is None or name == UNIFORM else scorer(name).name


def keep_scorer(name: str | None, keep_by: str | None) -> str:
    """The scorer ``--keep`` drops by, given ``--importance`` (:data:`UNIFORM` names none)
    and ``--keep-by``: :func:`kvzip.importance.keep.check_keep_by`."""
    return dropping.check_keep_by(keep_by, name if is_asked(name) else None)


def check_options(importance: str | None, keep: float | None, keep_rule: str, keep_by: str | None) -> str:
    """``--importance``, ``--keep``, ``--keep-rule`` and ``--keep-by`` checked together before
    any work (each command refuses the same inputs with the same message); the scorer
    ``--keep`` drops by (:func:`keep_scorer`)."""
    requested(importance)
    dropping.check_keep(keep, keep_rule)
    return keep_scorer(importance, keep_by)


def is_asked(name: str | None) -> bool:
    """Whether ``--importance`` names a scorer (not absent, not :data:`UNIFORM`)."""
    return name not in (None, UNIFORM)


def weighing(name: str | None, profile_default: str | None, keep_by: str | None = None) -> str | None:
    """The scorer whose classes weigh the lossy levels' steps, for a file or passage:
    the one ``--importance`` asks for (:data:`UNIFORM`: none); else, with ``--keep``, the
    scorer it drops by (``keep_by``: its pass is paid for anyway, and weighing what it
    kept measured 16% less KL for 1.5% more bits at ``--keep 0.5``, docs/benchmarks.md);
    else the profile's (``Resolved.importance``)."""
    if name is not None:
        return None if name == UNIFORM else scorer(name).name
    return keep_by if keep_by is not None else profile_default


def score(km: KVModel, ids: Sequence[int], name: str) -> Scored:
    """Prefill ``ids`` and score every stored entry with scorer ``name``."""
    return scorer(name).run(km, ids)


def heads_together(kv_heads: int, codecs: Iterable[Codec]) -> bool:
    """Whether a layer's kv heads are kept and classed together: they are several and some
    codec maps them jointly (a per-layer basis), so a position is one unit of its layer."""
    return kv_heads > 1 and not all(codec.codes_heads_apart() for codec in codecs)


def header_record(name: str, together: bool = False) -> dict:
    """What a file's header records of the importance it was coded with (``importance``);
    ``"heads": "layer"`` where the classes are a position's in all of a layer's heads
    (:func:`heads_together`), absent where each head has its own."""
    record = {"scorer": scorer(name).name, "shares": list(DEFAULT_SHARES), "factors": list(DEFAULT_FACTORS)}
    return {**record, "heads": "layer"} if together else record


@dataclass
class Applied:
    """A scored cache made ready to write: the entries kept, their importance classes (or
    None), the codecs (weighted by class when asked), and the header's records."""

    kv: LayeredKV
    classes: list[np.ndarray] | None
    pairs: list[tuple[str, Codec]]
    header: dict

    @property
    def weighed_by(self) -> str | None:
        """The scorer whose classes weigh the steps, as the header records it (None: some
        level was asked to weigh but none is lossy, or none was asked)."""
        record = self.header.get("importance")
        return None if record is None else record["scorer"]


def apply(scored: Scored, pairs: Sequence[tuple[str, Codec]], profile: Profile | None, *, weigh: bool,
          keep: float | None = None, keep_rule: str = "shared") -> Applied:
    """What ``kvzip encode --importance/--keep`` writes from ``scored``: with ``keep``, the
    fraction of entries :mod:`kvzip.importance.keep` keeps; with ``weigh``, the levels'
    steps scaled by importance class, the classes drawn among the entries kept (a level that
    does not weigh, ``lossless``, takes none: a file of such levels alone records no
    importance).  Both take a layer's heads together where a codec maps them jointly
    (:func:`heads_together`)."""
    kv, scores, header = scored.kv, scored.scores, {}
    together = heads_together(kv.kv_heads, (codec for _, codec in pairs))
    if keep is not None:
        before = kv.layout.stored()
        if keep < 1:
            masks = dropping.choose(scores, kv.layout, keep, keep_rule, heads_together=together)
            scores = dropping.prune_aligned(scores, kv.layout, masks)
            kv = kv.subset(masks)
        header["keep"] = dropping.header_record(keep, keep_rule, scored.scorer, together, before,
                                                kv.layout.stored())
    per_entry = None
    out = list(pairs)
    if weigh:
        out = [(name, weighted(codec, profile)) for name, codec in pairs]
    if any(w is not c for (_, w), (_, c) in zip(out, pairs)):  # some level weighs (not lossless alone)
        per_entry = classes(scores, heads_together=together)
        header["importance"] = header_record(scored.scorer, together)
    return Applied(kv, per_entry, out, header)
