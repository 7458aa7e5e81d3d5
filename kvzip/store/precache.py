"""Pre-caching: split documents into passages, prefill each once on its own, store it.

Each passage is prefilled at positions 0..n-1 with nothing before it, so its cache
depends only on its token ids, the model and the codec, and its artifact is named
by the hash of exactly those (content-addressed): a rerun, a second concurrent run,
or the same paragraph in two documents all land on the same name.  A run first
records every document's passages, then writes artifacts one by one, recording
each after its file is complete; so an interrupted run keeps everything it
finished, and the next run picks up at the first passage without a cache.

:func:`cache_passage` is the one per-passage function; the local engine calls it
in a loop and the Ray engine runs it as Ray tasks (``kvzip[ray]``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvzip import importance as scoring
from kvzip.errors import InputError, KvzipError, ModelMismatchError
from kvzip.importance.keep import DEFAULT_KEEP_RULE
from kvzip.levels import (
    DEFAULT_LEVEL,
    Progress,
    check_if_missing,
    chunk_span,
    codec_for_level,
    find_profile,
    is_calibrated,
    no_progress,
    resolve,
    write_kvz,
)
from kvzip.levels import check_level as _check_level
from kvzip.store.artifacts import ArtifactStore, artifact_name, codec_sha256
from kvzip.store.documents import (
    DEFAULT_PASSAGE_TOKENS,
    Passage,
    Tokenize,
    read_documents,
    split_document,
    token_sha256,
)
from kvzip.store.index import ArtifactRecord
from kvzip.store.opening import save_opening
from kvzip.store.store import PassageStore

if TYPE_CHECKING:  # the model loads when passages are cached
    from kvzip.model import KVModel

ENGINES = ("local", "ray")


def check_level(level: str | None) -> str:
    """The level to use (default: kvzip's default level), refusing unknown names before
    any model is loaded."""
    return _check_level(level or DEFAULT_LEVEL)


@dataclass(frozen=True)
class PassageJob:
    """Everything one passage's cache needs besides the model (picklable, for Ray)."""

    token_ids: tuple[int, ...]
    name: str
    level: str
    dtype: str
    model: str  # fingerprint the artifact must be written under
    profile: str | None = None  # digest of the calibration profile behind the level
    importance: str | None = None  # the scorer whose classes weigh the level's steps
    keep: Keep | None = None  # the entries kept, as `kvzip encode --keep`
    heads_together: bool = False  # one class per position for all of a layer's heads (a joint basis)


@dataclass(frozen=True)
class Keep:
    """``--keep``'s fraction and rule and the scorer that ranks the entries."""

    fraction: float
    rule: str
    scorer: str

    def record(self) -> dict:
        return {"fraction": self.fraction, "rule": self.rule, "scorer": self.scorer}


def make_job(passage_ids: Sequence[int], km: KVModel, level: str, profile: str | None = None,
             importance: str | None = None, keep: Keep | None = None) -> PassageJob:
    model = km.identity()["fingerprint"]
    together = importance is not None and _heads_together(level, profile, km.kv_heads)
    job = PassageJob(tuple(passage_ids), "", level, km.dtype, model, profile, importance, keep, together)
    name = artifact_name(model, level, km.dtype, token_sha256(passage_ids), profile, _treatment(job))
    return dataclasses.replace(job, name=name)


@functools.lru_cache(maxsize=8)
def _heads_together(level: str, profile: str | None, kv_heads: int) -> bool:
    """Whether the level's codec classes a layer's heads together (:func:`scoring.heads_together`)."""
    return scoring.heads_together(kv_heads, [codec_for_level(level, None if profile is None else find_profile(profile))])


def _treatment(job: PassageJob) -> dict | None:
    """What the artifact's name and codec hash record besides the level: the importance
    scorer (as its header records it) and what ``--keep`` kept; None for plain artifacts."""
    record = _importance(job)
    if job.keep is not None:
        record = {**(record or {}), "keep": job.keep.record()}
    return record


def _record(job: PassageJob, size: int) -> ArtifactRecord:
    return ArtifactRecord(
        job.name, job.model, job.level, codec_sha256(job.level, job.profile, _treatment(job)),
        job.dtype, token_sha256(job.token_ids), len(job.token_ids), size,
    )


def _importance(job: PassageJob) -> dict | None:
    """The header's ``importance`` record of the job's artifact."""
    return None if job.importance is None else scoring.header_record(job.importance, job.heads_together)


def _kept(record: dict | None) -> Keep | None:
    """The :class:`Keep` a file's header ``keep`` record describes."""
    if not isinstance(record, dict):
        return None
    return Keep(record.get("fraction"), record.get("rule"), record.get("scorer"))


def cache_passage(km: KVModel, job: PassageJob, artifacts: ArtifactStore) -> ArtifactRecord:
    """Prefill one passage on its own and write its artifact (the unit of work)."""
    if km.identity()["fingerprint"] != job.model:
        raise ModelMismatchError(f"a worker loaded {km.name}, not the model the run was planned for")
    profile = None if job.profile is None else find_profile(job.profile)
    levels: list = [job.level]
    classes = extra = None
    if job.importance is None and job.keep is None:
        kv = km.prefill(job.token_ids)
    else:  # scored, then weighed by class and/or pruned, as `kvzip encode --importance/--keep`
        scored = scoring.score(km, job.token_ids, job.keep.scorer if job.keep else job.importance)
        used = scoring.apply(scored, [(job.level, codec_for_level(job.level, profile))], profile,
                             weigh=job.importance is not None, keep=job.keep and job.keep.fraction,
                             keep_rule=job.keep.rule if job.keep else "shared")
        kv, classes, levels, extra = used.kv, used.classes, used.pairs, used.header
    size = artifacts.write(
        job.name,
        lambda path: write_kvz(
            kv, job.token_ids, path, km, levels=levels,
            chunk_tokens=chunk_span(keep=job.keep and job.keep.fraction), dtype=job.dtype, profile=profile,
            importance=classes, extra_header=extra,
        ),
    )
    return _record(job, size)


def _weighing(importance: str | None, profile_default: str | None, level: str, keep: Keep | None) -> str | None:
    """The scorer that weighs the passages' steps, as ``encode`` picks it
    (:func:`kvzip.importance.weighing`); None for a level that does not weigh."""
    if not is_calibrated(level):
        return None
    return scoring.weighing(importance, profile_default, keep and keep.scorer)


def adopt_artifact(job: PassageJob, artifacts: ArtifactStore) -> ArtifactRecord | None:
    """The record of an artifact a run wrote but did not get to record, if it is sound."""
    try:
        with artifacts.open(job.name) as reader:
            sound = (
                reader.header.model_fingerprint == job.model
                and job.level in reader.header.level_names
                and tuple(reader.token_ids().tolist()) == job.token_ids
                and reader.header.raw.get("importance") == _importance(job)
                and _kept(reader.header.raw.get("keep")) == job.keep
            )
            size = reader.source.size()
    except KvzipError:
        return None
    return _record(job, size) if sound else None


# --------------------------------------------------------------------- the run
@dataclass
class PrecacheSummary:
    store: str
    engine: str
    level: str
    importance: str | None  # the scorer whose classes weighed the steps (asked, or the profile's)
    documents: int
    passages: int
    unique_passages: int
    already_cached: int  # found in the index: nothing to do
    adopted: int  # found on storage but not in the index (an interrupted run): recorded
    cached: int  # prefilled and written by this run
    cached_tokens: int
    written_bytes: int
    seconds: float

    @property
    def passages_per_second(self) -> float:
        return self.cached / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passages_per_second": round(self.passages_per_second, 4)}


def tokenizer_with_offsets(km: KVModel) -> Tokenize:
    """Token ids and character offsets of a text (no special tokens), for splitting:
    :meth:`KVModel.tokenize_with_offsets`."""
    return km.tokenize_with_offsets


def plan(
    inputs: Sequence[str | Path],
    store: PassageStore,
    km: KVModel,
    *,
    passage_tokens: int | None,
    level: str,
    profile: str | None = None,
    importance: str | None = None,
    keep: Keep | None = None,
    progress: Progress = no_progress,
) -> tuple[list[Passage], list[PassageJob]]:
    """Split every document, record its passages, and list the passages' jobs (deduplicated)."""
    window = km.sliding_window
    if passage_tokens is None:
        passage_tokens = DEFAULT_PASSAGE_TOKENS if window is None else min(DEFAULT_PASSAGE_TOKENS, window - 1)
    if passage_tokens < 1:
        raise InputError(f"--passage-tokens must be positive, got {passage_tokens}")
    km.check_length(passage_tokens, f"a passage of --passage-tokens {passage_tokens}")
    if window is not None and passage_tokens > window - 1:
        raise InputError(
            f"--passage-tokens {passage_tokens} is more than {km.name}'s sliding layers keep "
            f"({window - 1} tokens); a passage must fit the window to be moved to a new position")
    docs = read_documents(inputs)
    identity = km.identity()
    store.index.add_model(identity)
    tokenize = tokenizer_with_offsets(km)
    passages: list[Passage] = []
    for i, doc in enumerate(docs):
        found = split_document(doc, tokenize, passage_tokens)
        store.index.replace_document(doc.key, identity["tokenizer_fingerprint"], found)
        passages.extend(found)
        progress("split", i + 1, len(docs))
    if not passages:
        raise InputError("the documents hold no text to pre-cache")
    jobs = {}
    for passage in passages:
        job = make_job(passage.token_ids, km, level, profile, importance, keep)
        jobs.setdefault(job.name, job)
    return passages, list(jobs.values())


def precache(
    inputs: Sequence[str | Path],
    store: PassageStore,
    km: KVModel,
    *,
    passage_tokens: int | None = None,
    level: str | None = None,
    engine: str = "local",
    profile: str | os.PathLike[str] | None = None,
    if_no_profile: str = "calibrate",
    importance: str | None = None,
    keep: float | None = None,
    keep_rule: str = DEFAULT_KEEP_RULE,
    keep_by: str | None = None,
    progress: Progress = no_progress,
) -> PrecacheSummary:
    """Pre-cache every passage of ``inputs`` into ``store`` that is not cached yet.

    A lossy level uses the model's calibration profile, found or built as
    :func:`kvzip.levels.resolve` does (``profile``, ``if_no_profile``).  ``importance``,
    ``keep``, ``keep_rule`` and ``keep_by`` score each passage and weigh or drop its
    entries as :func:`kvzip.api.encode` does; ``kvzip ask`` moves the kept entries.
    """
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    level = check_level(level)
    check_if_missing(if_no_profile)
    drop_by = scoring.check_options(importance, keep, keep_rule, keep_by)  # refused before any work
    if scoring.is_asked(importance) and not is_calibrated(level):
        raise InputError(f"--importance weighs a lossy level's steps; level {level!r} codes every entry alike")
    kept = None if keep is None else Keep(float(keep), keep_rule, drop_by)
    started = time.perf_counter()
    weigh_by = _weighing(importance, None, level, kept)
    passages, jobs = plan(inputs, store, km, passage_tokens=passage_tokens, level=level,
                          importance=weigh_by, keep=kept, progress=progress)
    if is_calibrated(level):  # found or built once the documents are known to hold text
        resolved = resolve([level], km, profile, if_no_profile, progress)
        weigh_by = _weighing(importance, resolved.importance, level, kept)  # as encode: the profile may ask
        if resolved.profile is not None:
            jobs = [make_job(job.token_ids, km, level, resolved.profile.digest, weigh_by, kept) for job in jobs]
    save_opening(store, km)  # the prompt's fixed opening, so that ask need not prefill it
    known = store.index.artifact_names()
    todo, adopted = [], 0
    for job in jobs:
        if job.name in known:
            continue
        record = adopt_artifact(job, store.artifacts) if store.artifacts.exists(job.name) else None
        if record is None:
            todo.append(job)
        elif store.index.add_artifact(record):  # else a concurrent run recorded it
            adopted += 1
    written: list[ArtifactRecord] = []
    finished = 0

    def done(record: ArtifactRecord | None) -> None:
        nonlocal finished
        finished += 1
        if record is not None and store.index.add_artifact(record):  # else another run won
            written.append(record)
        progress("precache", finished, len(todo))

    progress("precache", 0, len(todo))
    if engine == "local":
        for job in todo:
            done(None if store.index.has_artifact(job.name) else cache_passage(km, job, store.artifacts))
    else:
        _run_ray(todo, km, store.artifacts, done)
    return PrecacheSummary(
        store=str(store.root), engine=engine, level=level,
        importance=weigh_by, documents=len({p.doc_key for p in passages}), passages=len(passages),
        unique_passages=len(jobs), already_cached=len(jobs) - len(written) - adopted,
        adopted=adopted, cached=len(written), cached_tokens=sum(r.tokens for r in written),
        written_bytes=sum(r.bytes for r in written), seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------ Ray
def _run_ray(
    jobs: Sequence[PassageJob], km: KVModel, artifacts: ArtifactStore,
    done: Callable[[ArtifactRecord], None],
) -> None:
    """Run :func:`cache_passage` as Ray tasks; the driver records results as they come.

    Connects to the cluster in ``RAY_ADDRESS`` (or starts a local one) unless
    Ray is already initialised.  Workers load the model from the same spec and
    write to the same artifact URL, so it must be one they can reach.
    """
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'kvzip[ray]'") from None
    if artifacts.fs.protocol in ("memory", ("memory",)):
        raise InputError("memory:// artifacts live in this process only; Ray workers cannot reach them")
    spec = model_spec(km)
    if not jobs:
        return
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    task = ray.remote(num_cpus=1)(_ray_cache_passage)
    pending = [task.remote(spec, artifacts.url, job) for job in jobs]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        done(ray.get(finished[0]))


def model_spec(km: KVModel) -> str | None:
    """The ``--model`` string that loads ``km`` again in another process."""
    source = km.source
    if source is None:
        raise InputError("--engine ray needs a model that workers can load by name (pass --model)")
    if source.kind == "default":
        return None
    if source.kind == "gguf":
        return str(Path(source.path) / (source.gguf_file or ""))
    return source.path


@functools.lru_cache(maxsize=1)
def _worker_model(spec: str | None) -> KVModel:
    import torch

    from kvzip.model import KVModel

    torch.set_num_threads(1)  # one Ray CPU per task
    return KVModel.load(spec)


def _ray_cache_passage(spec: str | None, artifacts_url: str, job: PassageJob) -> ArtifactRecord:
    return cache_passage(_worker_model(spec), job, ArtifactStore(artifacts_url))
