"""Answering from the store: BM25-retrieve passages, attach their caches, generate.

The prompt is the chat template's opening (system turn and the start of the user
turn), then the passages, then the question and the opening of the assistant's
turn.  Only the question is computed at ask time: the passages come from their
artifacts, and the opening's cache from the store (:mod:`kvzip.store.opening`).  The same token ids prefilled from scratch
are the baseline, for time to first token and for fidelity.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvzip.errors import InputError, UnsupportedModelError
from kvzip.levels import DEFAULT_LEVEL, Progress, default_threads, no_progress, storage_to_kv
from kvzip.levels.executor import ENV_THREADS
from kvzip.levels.files import is_accelerator
from kvzip.store.assemble import CachedPassage, assemble
from kvzip.store.index import Hit
from kvzip.store.opening import load_opening, opening_ids
from kvzip.store.store import PassageStore

if TYPE_CHECKING:  # torch and the model load when a passage is read or assembled
    import torch

    from kvzip.model import KVModel

DEFAULT_TOP_K = 3


def query_terms(question: str) -> list[str]:
    """The words of a question, for an FTS5 query in which any word may match."""
    terms = re.findall(r"\w+", question)
    if not terms:
        raise InputError("the question has no words to search for")
    return terms


def choose_level(store: PassageStore, model: str, level: str | None) -> str:
    """The level asked for, else the default if the store has it, else the store's only one."""
    have = store.index.levels(model)
    if not have:
        raise InputError(
            f"{store.root} holds no passage caches for this model (fingerprint {model[:16]}…); "
            "run `kvzip precache` with the same --model"
        )
    if level is not None:
        if level not in have:
            raise InputError(f"{store.root} has no caches at level {level!r} (it has: {', '.join(have)})")
        return level
    if DEFAULT_LEVEL in have:
        return DEFAULT_LEVEL
    if len(have) == 1:
        return have[0]
    raise InputError(f"{store.root} holds several levels ({', '.join(have)}); pick one with --level")


def retrieve(
    store: PassageStore, question: str, km: KVModel, *, top_k: int, level: str | None = None,
    keep: float | None = None, importance: str | None = None,
) -> tuple[str, list[Hit]]:
    """(level, the ``top_k`` best passages that have a cache for ``km`` at that level), each
    hit's ``artifact`` the cache to use: stored with ``keep`` / ``importance`` when they are
    given (``precache --keep`` / ``--importance``; ``importance="none"``: uniform precision),
    else the passage's best unpruned cache (:func:`_artifact_for`; a passage cached only one
    way uses that)."""
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    identity = km.identity()
    level = choose_level(store, identity["fingerprint"], level)
    wanted = keep is not None or importance is not None
    hits = store.index.search(
        query_terms(question), k=4 * top_k if wanted else top_k, model=identity["fingerprint"],
        tokenizer=identity["tokenizer_fingerprint"], level=level,
    )
    if not hits:
        raise InputError("no stored passage shares a word with the question")
    chosen = []
    for hit in hits:
        name = _artifact_for(store, hit, keep, importance)
        if name is not None:
            chosen.append(dataclasses.replace(hit, artifact=name))
    if not chosen:
        how = " and ".join(x for x in (keep is not None and f"--keep {keep:g}",
                                         importance is not None and f"--importance {importance}") if x)
        raise InputError(f"no retrieved passage has a cache stored with {how}; precache it so")
    return level, chosen[:top_k]


def _treatment(store: PassageStore, name: str) -> tuple[str | None, float | None]:
    """(importance scorer, keep fraction) an artifact was stored with (None: not)."""
    with store.artifacts.open(name) as reader:
        raw = reader.header.raw
    imp, kept = raw.get("importance"), raw.get("keep")
    return (imp.get("scorer") if isinstance(imp, dict) else None,
            kept.get("fraction") if isinstance(kept, dict) else None)


def _artifact_for(store: PassageStore, hit: Hit, keep: float | None, importance: str | None) -> str | None:
    """The artifact of ``hit`` to use (see :func:`retrieve`), or None when none was stored so."""
    names = hit.artifacts or (hit.artifact,)
    if keep is None and importance is None and len(names) == 1:
        return names[0]
    ways = {name: _treatment(store, name) for name in names}
    want = None if importance == "none" else importance
    matching = [n for n, (imp, kept) in ways.items()
                if (importance is None or imp == want) and (keep is None or kept == keep)]
    # Of those that match what was asked: every entry before a pruned cache, and bits spent
    # by importance before uniform precision (at the same size it is the closer cache with
    # every scorer measured; it is also what precache stores by default where the profile
    # weighs, or without a profile); else the order they were stored in.
    return min(matching, key=lambda n: (ways[n][1] is not None, ways[n][0] is None), default=None)


def load_passage(
    store: PassageStore, hit: Hit, km: KVModel, level: str, *, decoders: int = 1
) -> CachedPassage:
    """Fetch and decode a retrieved passage's cache, refusing one that cannot be moved."""
    with store.artifacts.open(hit.artifact) as reader:
        km.check_stored_cache(reader.header)
        h = reader.header
        if h.rope_tables is None:
            raise UnsupportedModelError(
                f"artifact {hit.artifact} has rope: null (the model's positions are not a plain "
                "RoPE), so its keys cannot be moved to a new position"
            )
        freqs = [h.layer_rope_inv_freq(i) for i in range(h.num_layers)]
        if h.is_dense:
            kv = storage_to_kv(reader.decode_level(level, decoders=decoders), h.dtype)
            return CachedPassage(reader.token_ids().tolist(), kv, freqs)
        if not km.is_pruned_layout(h.layout):
            raise UnsupportedModelError(
                f"artifact {hit.artifact} is longer than the model's attention window; "
                "passages must fit it to be moved")
        # entries kept per (layer, kv head) (precache --keep): moved as they are
        kv = reader.decode_layers(level, decoders=decoders).map(lambda a: storage_to_kv(a, h.dtype))
        return CachedPassage(reader.token_ids().tolist(), kv, freqs)


def _load_or_recompute(store: PassageStore, hits: Sequence[Hit], km: KVModel, level: str,
                       opening_tokens: int) -> tuple[list[CachedPassage], list[int] | None]:
    """The passages' caches and None, or, when the model would read the whole context
    sooner than its caches decode, ``([], the passages' token ids)``.  That is asked only on an
    accelerator, from measured speeds: the first passage's decode (the measurement's cost),
    and the model's prefill (:meth:`KVModel.prefill_rate`); on the CPU recomputing never
    wins for a real model, and nothing is measured."""
    if not hits or not is_accelerator(km.device):
        return load_passages(store, hits, km, level), None
    decoders = passage_decoders()
    t0 = time.perf_counter()
    first = load_passage(store, hits[0], km, level, decoders=decoders)
    per_token = (time.perf_counter() - t0) / max(1, len(first.token_ids))
    rest = sum(h.tokens for h in hits[1:])
    context = opening_tokens + len(first.token_ids) + rest
    if context / km.prefill_rate() < per_token * (len(first.token_ids) + rest):  # the whole context's decode
        return [], first.token_ids + [t for h in hits[1:] for t in _artifact_ids(store, h)]
    return [first] + [load_passage(store, h, km, level, decoders=decoders) for h in hits[1:]], None


def _artifact_ids(store: PassageStore, hit: Hit) -> list[int]:
    with store.artifacts.open(hit.artifact) as reader:
        return reader.token_ids().tolist()


def passage_decoders() -> int:
    """Decoder threads per passage: 1 unless ``KVZIP_DECODE_WORKERS`` asks for more.

    A passage is only a few chunks; passages are decoded one after another, and
    on a small, shared machine more decoders per passage were no faster
    (measured with processes: docs/rag.md).
    """
    env = os.environ.get(ENV_THREADS, "").strip()
    return default_threads() if env else 1


def load_passages(
    store: PassageStore, hits: Sequence[Hit], km: KVModel, level: str, *, decoders: int | None = None
) -> list[CachedPassage]:
    """:func:`load_passage` for each hit, one after another, ``decoders`` processes each
    (default: :func:`passage_decoders`)."""
    n = passage_decoders() if decoders is None else max(1, decoders)
    return [load_passage(store, hit, km, level, decoders=n) for hit in hits]


def prompt_ids(km: KVModel, question: str) -> tuple[list[int], list[int]]:
    """(ids before the passages: the fixed opening, ids after them) for ``question``."""
    chat = km.chat_template()
    if chat is None:
        return opening_ids(km), km.encode_text("\n\n" + question, special_tokens=False)
    return opening_ids(km), km.prompt_ids(question, chat)


@dataclass
class Source:
    doc_key: str
    source: str
    passage: int
    tokens: int
    bm25: float
    artifact: str = ""  # the cache used


@dataclass
class AskResult:
    answer: str
    new_token_ids: list[int]
    level: str
    sources: list[Source]
    context_tokens: int  # prefix + passages
    prompt_tokens: int  # question and the assistant's opening
    blend_recompute: float
    retrieve_seconds: float
    fetch_seconds: float  # fetch + decode every passage
    assemble_seconds: float  # the opening's cache, key rotation, boundary recompute
    first_token_seconds: float  # fetch + assemble + the first new token
    total_seconds: float
    baseline_first_token_seconds: float | None = None  # full prefill of the same ids
    baseline_identical: bool | None = None
    opening_seconds: float = 0.0  # part of assemble_seconds: reading (or prefilling) the opening
    opening_source: str = ""  # where the opening's cache came from: memory, store or prefill
    context_source: str = "cache"  # "recompute": the model prefilled the context instead (faster here)

    @property
    def speedup(self) -> float | None:
        if self.baseline_first_token_seconds is None:
            return None
        return self.baseline_first_token_seconds / max(self.first_token_seconds, 1e-9)


def ask(
    store: PassageStore,
    question: str,
    km: KVModel,
    *,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = 64,
    level: str | None = None,
    blend_recompute: float = 0.0,
    recompute_window: bool = False,
    compare: bool = True,
    keep: float | None = None,
    importance: str | None = None,
    progress: Progress = no_progress,
) -> AskResult:
    """Answer ``question`` from the store's passages (greedy), timing it against a full prefill.

    ``recompute_window``: on a model with sliding-window layers, recompute their last
    window from the text instead of using the passages' moved keys there
    (:func:`~kvzip.store.assemble.assemble`).  ``keep`` / ``importance``: use the passages'
    caches stored with ``precache --keep`` / ``--importance`` (``"none"``: the uniform ones;
    default: each passage's best unpruned cache, :func:`retrieve`)."""
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if not 0.0 <= blend_recompute <= 1.0:
        raise InputError(f"--blend-recompute must be between 0 and 1, got {blend_recompute}")
    started = time.perf_counter()
    level, hits = retrieve(store, question, km, top_k=top_k, level=level, keep=keep, importance=importance)
    retrieved = time.perf_counter()
    before, after = prompt_ids(km, question)
    passages, recomputed = _load_or_recompute(store, hits, km, level, len(before))
    recompute = recomputed is not None
    fetched = time.perf_counter()
    if recomputed is not None:  # the model reads the context faster than it would decode: exact, sooner
        context_ids = list(before) + recomputed
        kv, opening_source = None, ""
        opened = assembled = time.perf_counter()
    else:
        opening_kv, opening_source = load_opening(km, before, store) if before else (None, "")
        opened = time.perf_counter()
        context_ids, kv = assemble(km, before, passages, blend_fraction=blend_recompute, prefix_kv=opening_kv,
                                   recompute_window=recompute_window)
        assembled = time.perf_counter()
    ids = context_ids + after
    run = km.generate_timed(ids, kv=kv, max_new_tokens=max_new_tokens)
    offset = assembled - retrieved
    result = AskResult(
        answer=km.decode_ids(run.new_ids),
        new_token_ids=run.new_ids,
        level=level,
        sources=[Source(h.doc_key, h.source, h.number, h.tokens, h.score, h.artifact) for h in hits],
        context_tokens=len(context_ids),
        prompt_tokens=len(after),
        blend_recompute=blend_recompute,
        retrieve_seconds=retrieved - started,
        fetch_seconds=fetched - retrieved,
        assemble_seconds=assembled - fetched,
        first_token_seconds=offset + run.first_token_seconds,
        total_seconds=offset + run.total_seconds,
        opening_seconds=opened - fetched,
        opening_source=opening_source,
        context_source="recompute" if recompute else "cache",
    )
    if compare:
        progress("baseline", 0, 1)
        base = km.generate_timed(ids, max_new_tokens=max_new_tokens)
        result.baseline_first_token_seconds = base.first_token_seconds
        result.baseline_identical = base.new_ids == run.new_ids
        progress("baseline", 1, 1)
    return result


# -------------------------------------------------------------------- fidelity
@dataclass
class Fidelity:
    """How far answers from an assembled cache stray from a full prefill of the same ids."""

    kl_nats_per_token: float  # mean KL(full || assembled) over the answer's tokens
    greedy_agreement: float  # share of answer tokens where both caches pick the same token
    answer_tokens: int


def fidelity(
    km: KVModel,
    context_ids: Sequence[int],
    kv: torch.Tensor,
    after_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    full_kv: torch.Tensor | None = None,
) -> Fidelity:
    """Teacher-force the full prefill's greedy answer under both caches and compare.

    ``full_kv`` is the full prefill of ``context_ids`` when the caller has it already.
    """
    import torch

    with torch.inference_mode():
        full = km.prefill(context_ids) if full_kv is None else full_kv
        answer = km.generate(list(context_ids) + list(after_ids), kv=full, max_new_tokens=max_new_tokens)
        forced = list(after_ids) + answer[:-1]
        start = len(after_ids) - 1
        ref = torch.log_softmax(km.teacher_force(full, forced)[start:], dim=-1)
        got = torch.log_softmax(km.teacher_force(kv, forced)[start:], dim=-1)
        kl = (ref.exp() * (ref - got)).sum(dim=-1)
        agree = (got.argmax(dim=-1) == ref.argmax(dim=-1)).float()
    return Fidelity(float(kl.mean()), float(agree.mean()), len(answer))
