"""Adaptive streaming for generation: fetch a context chunk by chunk, attach it, generate.

:func:`stream_generate` opens a context (a kvzip manifest URL, or a ``.kvz`` URL
on any server with byte ranges), then a download thread walks the chunks: for
each it asks :func:`~kvzip.stream.controller.choose_level` for the best level
that still meets the deadline at the throughput and per-level decode speeds
measured so far, fetches that payload and checks its checksum, while the
calling thread decodes the chunks before it, on threads (decoding overlaps downloading).  A chunk no level can deliver in
time is recomputed by the model from its token ids, with the chunks before it
as cache.  Calibration profiles the chosen levels need and this machine lacks
are fetched (and checked against their digest) before the first chunk.  The
result reports time to first token and where it went.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import torch

from kvzip.codecs import one_blas_thread
from kvzip.errors import FetchError, InputError, UnknownLevelError
from kvzip.formats import IndexEntry, KvzHeader, KvzReader, LayeredKV, PositionLayout
from kvzip.levels import LevelCodecs, Progress, default_threads, no_progress, storage_to_kv
from kvzip.levels.chunks import chunk_elements
from kvzip.model import TORCH_DTYPES, ChatTemplate, KVModel
from kvzip.model.device import is_accelerator
from kvzip.stream.controller import (
    DEFAULT_DECODE_PRIOR,
    Decision,
    DecodeMeter,
    ThroughputMeter,
    choose_level,
    rank_levels,
)
from kvzip.stream.http import Budget, DownloadLimits, HttpRangeSource, RetryPolicy, get_json, new_client
from kvzip.stream.manifest import ChunkInfo, ContextManifest, manifest_from_reader, parse_manifest
from kvzip.stream.profiles import ProfileStatus, ensure_profiles

RECOMPUTE = "recompute"  # the level reported for a chunk the model recomputed
LOOKAHEAD = 2  # chunks downloaded ahead of the decoder: overlap, with bounded memory


@dataclass
class ChunkReport:
    chunk: int
    tokens: int
    level: str  # a level name, or RECOMPUTE
    bytes: int  # payload bytes fetched (0 when recomputed)
    fetch_seconds: float
    work_seconds: float  # decoding, or recomputing
    throughput_mbps: float  # the estimate the decision used
    seconds_left: float | None  # time left before the deadline, at the decision
    predicted_seconds: float | None  # when the plan said the rest would be ready, from then


@dataclass
class StreamResult:
    text: str
    new_token_ids: list[int]
    cached_tokens: int
    prompt_tokens: int
    deadline: float | None
    deadline_met: bool | None  # context ready (fetched, decoded, recomputed) by the deadline
    context_ready_seconds: float
    first_token_seconds: float  # time to first token, from the call
    total_seconds: float
    # Where the time to first token went; network and decoding overlap, so
    # network_seconds (time spent in transfers) and decode_seconds can add up to
    # more than context_ready_seconds.  network_wait_seconds is the part the
    # decoder spent waiting for bytes.
    manifest_seconds: float
    network_seconds: float
    network_wait_seconds: float
    decode_seconds: float
    recompute_seconds: float
    prompt_and_first_token_seconds: float
    bytes_fetched: int
    chunks: list[ChunkReport] = field(default_factory=list)
    # Calibration profiles the decoded levels need: fetched now, or found here.
    profiles: list[ProfileStatus] = field(default_factory=list)
    profile_seconds: float = 0.0  # fetching missing profiles (part of manifest..ready)

    @property
    def levels(self) -> list[str]:
        return [c.level for c in self.chunks]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "levels": self.levels}


# ---------------------------------------------------------------- open a context
def open_context(
    url: str, client: httpx.Client, policy: RetryPolicy = RetryPolicy(), budget: Budget | None = None
) -> tuple[ContextManifest, HttpRangeSource, float]:
    """(manifest, source of the file's bytes, throughput estimate in bytes/s) for ``url``.

    A URL whose path ends in ``.kvz`` is read with range requests from any
    server; anything else is taken as a kvzip manifest URL.  The estimate is the
    rate the bodies arrived at; small bodies underestimate a fast link, which
    errs on the side of meeting the deadline, and the first chunk corrects it.
    Every request (the source's too) is part of ``budget``'s download.
    """
    budget = budget or Budget()
    if httpx.URL(url).path.endswith(".kvz"):
        source = HttpRangeSource(url, client, policy=policy, budget=budget)
        reader = KvzReader(source)
        manifest = manifest_from_reader(reader, url, source.etag)
        rate = source.bytes_received / max(source.body_seconds, 1e-6)
    else:
        data, rate = get_json(client, url, policy, budget)
        manifest = parse_manifest(data, url)
        source = HttpRangeSource(
            manifest.file_url, client, etag=manifest.etag, size=manifest.file_size, policy=policy,
            budget=budget,
        )
    return manifest, source, rate


# ------------------------------------------------------------------ decode a chunk
@torch.inference_mode()
def recompute_chunk(km: KVModel, previous: Sequence[torch.Tensor], ids: Sequence[int]) -> torch.Tensor:
    """The KV of ``ids`` read after the cached chunks ``previous``, as [2, L, H, len(ids), D]."""
    past = torch.cat(list(previous), dim=3) if previous else None
    cached = 0 if past is None else past.shape[3]
    return km.extend(past, ids).dense_array("recomputing a chunk")[:, :, :, cached:]


@torch.inference_mode()
def recompute_layers(km: KVModel, layout: PositionLayout, previous: Sequence[list[torch.Tensor]],
                     token_ids: Sequence[int], start: int, end: int) -> list[torch.Tensor]:
    """A chunk ``[start, end)`` of a file with a position layout, recomputed from its text:
    each layer's K/V at the positions the layout gives it there.  The tokens read again
    begin one attention window before the chunk (a sliding layer's keys there need the
    window before them), every layer seeing what is cached before that; the rest of
    what was recomputed is dropped."""
    window = km.sliding_window or 1
    first = max(0, start - (window - 1))
    layers = [torch.cat([p[i] for p in previous], dim=2) if previous else None for i in range(layout.num_layers)]
    past_positions = [[layout.in_range(i, h, 0, start) for h in range(layout.kv_heads)]
                      for i in range(layout.num_layers)]
    past = LayeredKV(
        [x if x is not None else torch.zeros((2, layout.kv_heads, 0, km.head_dim)) for x in layers],
        PositionLayout(past_positions, start))
    visible = torch.ones(start, dtype=torch.bool)
    visible[first:] = False  # read again below
    fresh = km.extend_at(past, token_ids[first:end], range(first, end), visible=visible)
    out = []
    for i in range(layout.num_layers):
        held = layout.in_range(i, 0, start, end)
        out.append(fresh[:, i, :, torch.from_numpy(held - first)])
    return out


def join_chunks(header: KvzHeader, chunks: Sequence[ChunkInfo], parts: Sequence[list[torch.Tensor]]) -> LayeredKV:
    """The chunks' layers (each ``[2, H, n, D]``, a head with fewer entries in the chunk
    padded at the end) as the file's :class:`LayeredKV`: a layer whose heads share their
    positions end to end, one whose heads differ head by head, each padded once at the end."""
    layout = header.layout
    layers = []
    for i in range(header.num_layers):
        if layout.heads_share(i):
            layers.append(torch.cat([p[i] for p in parts], dim=2))
            continue
        out = parts[0][i].new_zeros((2, layout.kv_heads, layout.layer_width(i), header.head_dim))
        for h in range(layout.kv_heads):
            at = 0
            for chunk, p in zip(chunks, parts):
                n = layout.in_range(i, h, chunk.token_start, chunk.token_start + chunk.token_count).size
                out[:, h, at : at + n] = p[i][:, h, :n]
                at += n
        layers.append(out)
    return LayeredKV(layers, layout)


def _chunk_elements(manifest: ContextManifest, chunk: ChunkInfo) -> int:
    """K/V elements the chunk holds (keys and values, every layer and head it carries):
    what decoding it scales with."""
    return chunk_elements(manifest.header, chunk.token_start, chunk.token_start + chunk.token_count)


# ------------------------------------------------------------------- the download thread
@dataclass
class _Fetched:
    report: ChunkReport
    entry: IndexEntry | None  # None: recompute
    payload: bytes = b""


class _Downloader(threading.Thread):
    """Fetches chunk payloads in order, one level decision per chunk, at most LOOKAHEAD ahead."""

    def __init__(self, manifest: ContextManifest, source: HttpRangeSource, levels: list[str],
                 meter: ThroughputMeter, decode_meter: DecodeMeter, deadline: float | None,
                 started: float):
        super().__init__(name="kvzip-stream-download", daemon=True)
        self.manifest, self.source, self.levels = manifest, source, levels
        self.meter, self.decode_meter = meter, decode_meter
        self.deadline, self.started = deadline, started
        self.out: queue.Queue[_Fetched | BaseException] = queue.Queue(LOOKAHEAD)
        self.stop = threading.Event()
        self.consumed = threading.Semaphore(0)  # released by the consumer after each chunk
        self._consumed = 0
        # The decoder's progress, written by the consumer: chunks done, and when it
        # started the one it is on (None while it waits for the network).
        self.decoded = 0
        self.decoding_since: float | None = None
        self._handed: list[tuple[str | None, int]] = []  # (level or None, elements) per chunk handed over
        # A prior from the caller, then measured by the consumer on each recomputed chunk.
        self.recompute_seconds_per_token: float | None = None

    def decoder_busy(self, handed_over: int, now: float) -> float:
        """Predicted seconds until the decoder has done the chunks already handed over,
        at the decode speeds measured by now (a chunk planned before its level was
        measured is not held to the prior it was planned with)."""
        done, since = self.decoded, self.decoding_since
        times = [0.0 if level is None else self.decode_meter.predict(level, n)
                 for level, n in self._handed[done:handed_over]]
        busy = sum(times)
        if since is not None and times:
            busy -= min(now - since, times[0])
        return max(0.0, busy)

    def run(self) -> None:
        try:
            chunks = self.manifest.chunks
            elements = [_chunk_elements(self.manifest, c) for c in chunks]
            for i, chunk in enumerate(chunks):
                now = time.perf_counter()
                left = None if self.deadline is None else self.deadline - (now - self.started)
                per_token = self.recompute_seconds_per_token
                decode = {level: [self.decode_meter.predict(level, n) for n in elements[i:]]
                          for level in self.levels}
                decision = choose_level(
                    [c.sizes() for c in chunks[i:]], self.levels, self.meter.bytes_per_second,
                    math.inf if left is None else left,
                    None if per_token is None else per_token * sum(c.token_count for c in chunks[i:]),
                    decode_seconds=decode, decoder_busy=self.decoder_busy(i, now),
                )
                self._handed.append((decision.level, elements[i]))
                self._put(self._fetch(chunk.chunk, chunk.token_count, chunk.payloads, decision, left))
                if decision.recompute:
                    # Decide the next chunk only once this one is recomputed: by then the
                    # clock has moved and the recompute's cost is measured.
                    self._wait_until_consumed(i + 1)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _wait_until_consumed(self, count: int) -> None:
        while self._consumed < count and not self.stop.is_set():
            if self.consumed.acquire(timeout=0.1):
                self._consumed += 1

    def _fetch(self, number: int, tokens: int, payloads: dict[str, IndexEntry],
               decision: Decision, left: float | None) -> _Fetched:
        report = ChunkReport(number, tokens, decision.level or RECOMPUTE, 0, 0.0, 0.0,
                             self.meter.bytes_per_second * 8 / 1e6, left,
                             None if math.isinf(decision.predicted_seconds)
                             else decision.predicted_seconds)
        if decision.level is None:
            return _Fetched(report, None)
        entry = payloads[decision.level]
        t0 = time.perf_counter()
        payload = self.source.get_bytes(entry.offset, entry.length)
        report.fetch_seconds = time.perf_counter() - t0
        report.bytes = len(payload)
        if zlib.crc32(payload) != entry.crc32:
            raise FetchError(
                f"chunk {number} of level {decision.level!r}: checksum mismatch "
                f"(expected {entry.crc32:08x}, got {zlib.crc32(payload):08x}); the server sent "
                "corrupt bytes"
            )
        self.meter.add(len(payload), report.fetch_seconds)
        return _Fetched(report, entry, payload)

    def _put(self, item: _Fetched | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


# --------------------------------------------------------------------------- generate
def stream_generate(
    url: str,
    prompt: str,
    model: KVModel,
    *,
    deadline: float | None = None,
    max_new_tokens: int = 64,
    levels: Sequence[str] | None = None,
    initial_mbps: float | None = None,
    recompute_tokens_per_second: float | None = None,
    decode_prior: float = DEFAULT_DECODE_PRIOR,
    client: httpx.Client | None = None,
    policy: RetryPolicy = RetryPolicy(),
    limits: DownloadLimits = DownloadLimits(),
    progress: Progress = no_progress,
    decoders: int | None = None,
) -> StreamResult:
    """Stream the context at ``url`` into ``model``'s cache and generate after ``prompt``.

    ``deadline`` (seconds from the call) bounds the time until the context is
    ready; None fetches every chunk at the best level.  ``levels`` restricts the
    levels used (an empty list recomputes everything, the text-only baseline).
    ``initial_mbps`` replaces the throughput estimate taken while opening.
    ``recompute_tokens_per_second`` is a prior for how fast ``model`` recomputes
    (its prefill speed on this machine); without it, a model on an accelerator has
    its prefill speed measured first (:meth:`KVModel.prefill_rate`), and on the CPU
    the first recompute is taken on CacheGen's assumption that recomputing is cheap,
    and measured.  Recomputing is chosen when it would be ready sooner than the level
    that fits (``choose_level``).
    ``decode_prior`` is the seconds per K/V element assumed for decoding a level
    not measured yet (default: a conservative :data:`DEFAULT_DECODE_PRIOR`);
    each level's decode speed is then measured on its chunks.  ``decoders``: how
    many chunks may be decoded at once (default: the CPUs this process may use).
    ``limits`` bound the download itself (manifest, profiles and chunks): its
    overall time, the minimum speed of each body, redirects to other hosts;
    breaking one is a :class:`FetchError` (``deadline`` only steers quality).
    """
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    if deadline is not None and not deadline > 0:
        raise InputError(f"--deadline must be a positive number of seconds, got {deadline}")
    started = time.perf_counter()
    own_client = client is None
    client = client or new_client()
    budget = limits.start()
    try:
        manifest, source, estimate = open_context(url, client, policy, budget)
        manifest_seconds = time.perf_counter() - started
        header = manifest.header
        model.check_stored_cache(header)
        allowed = _allowed_levels(manifest, levels)
        # A level whose codec names a profile this machine lacks: fetch it (verified) first.
        t_profiles = time.perf_counter()
        profiles = ensure_profiles(manifest.profiles_for(allowed), client, policy, budget)
        profile_seconds = time.perf_counter() - t_profiles
        meter = ThroughputMeter(initial_mbps * 1e6 / 8 if initial_mbps else estimate)
        downloader = _Downloader(manifest, source, allowed, meter, DecodeMeter(decode_prior),
                                 deadline, started)
        if not header.is_dense and model.is_pruned_layout(header.layout):
            # Entries dropped by --keep: a chunk recomputed from its text would hold other
            # entries than the file's, so every chunk is fetched (the fastest level when
            # none fits the deadline).
            if not allowed:
                raise InputError("this file keeps only some of its entries (--keep): its chunks cannot be "
                                 "recomputed from the text; stream at least one of its levels")
            downloader.recompute_seconds_per_token = math.inf
        else:
            if not recompute_tokens_per_second and is_accelerator(model.device):
                # an accelerator may recompute faster than any link delivers: measure it first
                recompute_tokens_per_second = model.prefill_rate()
            if recompute_tokens_per_second:
                downloader.recompute_seconds_per_token = 1 / recompute_tokens_per_second
        downloader.start()
        try:
            parts, reports, wait, decode_s, recompute_s = _assemble(
                manifest, model, downloader, progress, decoders)
        finally:
            downloader.stop.set()
            downloader.join()
    finally:
        if own_client:
            client.close()
    ready = time.perf_counter()
    kv = torch.cat(parts, dim=3) if header.is_dense else join_chunks(header, manifest.chunks, parts)
    chat = ChatTemplate.from_info(header.chat)
    doc_ids = manifest.token_ids
    prompt_ids = model.prompt_ids(prompt, chat)
    first: list[float] = []
    new_ids = model.generate(
        doc_ids + prompt_ids, kv=kv, max_new_tokens=max_new_tokens,
        on_token=lambda: first.append(time.perf_counter()) if not first else None,
    )
    done = time.perf_counter()
    first_at = first[0] if first else done
    context_ready = ready - started
    return StreamResult(
        text=model.decode_ids(new_ids),
        new_token_ids=new_ids,
        cached_tokens=len(doc_ids),
        prompt_tokens=len(prompt_ids),
        deadline=deadline,
        deadline_met=None if deadline is None else context_ready <= deadline,
        context_ready_seconds=context_ready,
        first_token_seconds=first_at - started,
        total_seconds=done - started,
        manifest_seconds=manifest_seconds,
        network_seconds=sum(r.fetch_seconds for r in reports),
        network_wait_seconds=wait,
        decode_seconds=decode_s,
        recompute_seconds=recompute_s,
        prompt_and_first_token_seconds=first_at - ready,
        bytes_fetched=sum(r.bytes for r in reports),
        chunks=reports,
        profiles=profiles,
        profile_seconds=profile_seconds,
    )


def _allowed_levels(manifest: ContextManifest, levels: Sequence[str] | None) -> list[str]:
    ranked = rank_levels([c.sizes() for c in manifest.chunks])
    if levels is None:
        return ranked
    unknown = [name for name in levels if name not in ranked]
    if unknown:
        raise UnknownLevelError(
            f"the context has no level {unknown[0]!r} (it has: {', '.join(ranked)})"
        )
    return [name for name in ranked if name in levels]


def _assemble(
    manifest: ContextManifest, model: KVModel, downloader: _Downloader, progress: Progress,
    decoders: int | None = None,
) -> tuple[list[torch.Tensor], list[ChunkReport], float, float, float]:
    """Decode or recompute each chunk as the downloader delivers it, in order.

    Decoding runs on ``decoders`` threads (default: the CPUs this process may use), so
    chunks that arrive faster than one core decodes them are decoded side by side
    (kvzip's codecs decode outside the GIL).  Everything the controller is told (a
    chunk decoded, its decode speed) is told in chunk order, on this thread, once a
    chunk's decode has finished; a chunk to recompute waits for every chunk before it,
    which it uses as its cache."""
    decoder = LevelCodecs(manifest.header)
    header = manifest.header
    dtype = TORCH_DTYPES[header.dtype]
    n_threads = max(1, default_threads() if decoders is None else int(decoders))
    parts: list[torch.Tensor] = []
    reports: list[ChunkReport] = []
    wait = decode_s = recompute_s = 0.0
    total = len(manifest.chunks)
    # (chunk, what was fetched, when its decode was handed out, the decode)
    in_flight: collections.deque[tuple[ChunkInfo, _Fetched, float, Future[tuple[torch.Tensor, float]]]] = (
        collections.deque())

    def decode(item: _Fetched) -> tuple[torch.Tensor | list[torch.Tensor], float]:
        t = time.perf_counter()
        if header.is_dense:
            kv = storage_to_kv(decoder.decode(item.entry, item.payload), header.dtype)
        else:
            kv = [storage_to_kv(a, header.dtype) for a in decoder.decode_layers(item.entry, item.payload)]
        return kv, time.perf_counter() - t

    def finish(report: ChunkReport) -> None:
        reports.append(report)
        # the decoder is now on the oldest chunk still in flight, if any
        downloader.decoding_since = in_flight[0][2] if in_flight else None
        downloader.decoded += 1
        downloader.consumed.release()
        progress("stream", len(parts), total)

    def finish_oldest() -> None:
        nonlocal decode_s
        chunk, item, _, future = in_flight.popleft()
        kv, seconds = future.result()
        parts.append(kv)
        item.report.work_seconds = seconds
        decode_s += seconds
        downloader.decode_meter.add(item.report.level, _chunk_elements(manifest, chunk), seconds)
        finish(item.report)

    with one_blas_thread(), ThreadPoolExecutor(n_threads, thread_name_prefix="kvzip-decode") as pool:
        try:
            for chunk in manifest.chunks:
                t0 = time.perf_counter()
                item = downloader.out.get()
                t1 = time.perf_counter()
                wait += t1 - t0
                if isinstance(item, BaseException):
                    raise item
                if item.entry is None:  # recompute, with every chunk before it decoded
                    while in_flight:
                        finish_oldest()
                    t1 = downloader.decoding_since = time.perf_counter()
                    if header.is_dense:
                        parts.append(recompute_chunk(model, parts, chunk.token_ids).to(dtype))
                    else:
                        end = chunk.token_start + chunk.token_count
                        parts.append([x.to(dtype) for x in recompute_layers(
                            model, header.layout, parts, manifest.token_ids, chunk.token_start, end)])
                    item.report.work_seconds = time.perf_counter() - t1
                    recompute_s += item.report.work_seconds
                    downloader.recompute_seconds_per_token = item.report.work_seconds / chunk.token_count
                    finish(item.report)
                    continue
                if not in_flight:
                    downloader.decoding_since = t1
                in_flight.append((chunk, item, t1, pool.submit(decode, item)))
                if len(in_flight) >= n_threads:
                    finish_oldest()
            while in_flight:
                finish_oldest()
        finally:
            for *_, future in in_flight:
                future.cancel()
    return parts, reports, wait, decode_s, recompute_s
