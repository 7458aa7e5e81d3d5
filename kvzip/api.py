"""kvzip's library surface: encode, inspect, verify, decode, generate.

The CLI is a thin layer over these functions, and other programs call them
directly.  Nothing here prints: long steps report through a ``progress``
callback ``(stage, done, total)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvzip import importance as scoring
from kvzip.atomic import write_atomic
from kvzip.codecs import STORAGE_DTYPES
from kvzip.errors import ContextTooLongError, InputError, KvzipError
from kvzip.formats import ChatInfo, SourceInfo, open_kvz
from kvzip.formats.limits import memory_limit
from kvzip.importance.keep import DEFAULT_KEEP_RULE
from kvzip.levels import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_LEVEL,
    CacheFile,
    EncodeSummary,
    LoadedKV,
    Progress,
    attach_kv,
    check_if_missing,
    check_levels,
    chunk_span,
    find_profile,
    kv_to_storage,
    load_kv,
    no_progress,
    open_cache,
    resolve,
    storage_to_kv,
    stream_prefill,
    write_kvz,
)
from kvzip.stream.fetch import FetchSummary, fetch
from kvzip.stream.http import DownloadLimits

if TYPE_CHECKING:  # torch and the model load when a command runs one, not to read a file
    import torch

    from kvzip.model import KVModel
    from kvzip.stream.client import StreamResult

ModelLike = "KVModel | str | None"


def __getattr__(name: str) -> Any:
    if name == "StreamResult":  # re-exported, loaded on first use (it imports torch)
        from kvzip.stream.client import StreamResult

        return StreamResult
    raise AttributeError(f"module 'kvzip.api' has no attribute {name!r}")

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DecodeSummary",
    "DownloadLimits",
    "EncodeSummary",
    "FetchSummary",
    "StreamResult",
    "GenerateResult",
    "LoadedKV",
    "VerifyReport",
    "decode",
    "encode",
    "fetch",
    "generate",
    "generate_url",
    "info",
    "is_url",
    "kv_to_storage",
    "load_kv",
    "load_model",
    "input_size",
    "read_text",
    "storage_to_kv",
    "verify",
    "write_kvz",
]


def load_model(model: ModelLike = None, *, device: str | torch.device | None = None,
               model_dtype: str | torch.dtype | None = None) -> KVModel:
    """A :class:`KVModel` from a spec (None = embedded default) on ``device`` (default
    ``auto``: an accelerator when torch sees one) with its weights in ``model_dtype``
    (default: float32 on the CPU, bfloat16 on an accelerator), or the one given."""
    from kvzip.model import KVModel

    if isinstance(model, KVModel):
        return model
    return KVModel.load(model, device=device, dtype=model_dtype)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """One-line errors for the usual failures of reading a user's file."""
    try:
        if path.is_dir():
            raise InputError(f"input is a directory, not a text file: {path}")
        yield
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"input is a directory, not a text file: {path}") from None
    except PermissionError:
        raise InputError(f"input file is not readable (permission denied): {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def input_size(source: str | os.PathLike[str]) -> int:
    """The size of a text file about to be read, with :func:`read_text`'s one-line errors."""
    path = Path(source)
    with _reading(path), open(path, "rb") as handle:
        return os.fstat(handle.fileno()).st_size


def read_text(source: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """Read a UTF-8 text file with one-line errors for the usual failures; one larger
    than ``max_bytes`` (see ``KVModel.max_text_bytes``) is refused before it is read."""
    path = Path(source)
    if max_bytes is not None and (size := input_size(path)) > max_bytes:
        raise ContextTooLongError(f"{path} is {size} bytes, more than the {max_bytes} bytes of "
                                  "text the model's context can hold")
    with _reading(path), open(path, "rb") as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew while we looked
        raise ContextTooLongError(f"{path} holds more than the {max_bytes} bytes of text "
                                  "the model's context can hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start} is invalid)") from None


# ---------------------------------------------------------------------- encode
def encode(
    text: str,
    out: str | os.PathLike[str],
    *,
    model: ModelLike = None,
    levels: Sequence[str] = (DEFAULT_LEVEL,),
    chunk_tokens: int | None = None,
    dtype: str | None = None,
    chat: bool = False,
    source_name: str | None = None,
    profile: str | os.PathLike[str] | None = None,
    if_no_profile: str = "calibrate",
    importance: str | None = None,
    keep: float | None = None,
    keep_rule: str = DEFAULT_KEEP_RULE,
    keep_by: str | None = None,
    device: str | torch.device | None = None,
    model_dtype: str | torch.dtype | None = None,
    prefill_cache: str = "auto",
    progress: Progress = no_progress,
) -> EncodeSummary:
    """Prefill ``text`` with the model and write its KV cache to ``out`` as a ``.kvz``.

    ``importance`` names a scorer (``kvzip.importance``: ``reconstruct``, ``prefill``,
    ``keynorm``): every entry is scored and the lossy levels code the most important ones
    at a finer step and the least at a coarser one, at about the level's size.  Not given,
    the calibration profile decides (``kvzip calibrate`` turns ``prefill`` on for a model
    whose uniform levels miss its quality bound), and without a profile the uncalibrated
    levels use ``prefill`` (:data:`kvzip.levels.UNCALIBRATED_IMPORTANCE`); ``"none"``:
    uniform precision.

    ``keep`` (a fraction in (0, 1]) drops entries: the file keeps that fraction of them by
    score (``keep_by``, else ``importance``'s scorer, else ``reconstruct``), the attention
    sinks and the last position always; ``keep_rule``: ``"shared"`` (one budget across heads
    and layers) or ``"head"`` (the same fraction in every head); see
    :mod:`kvzip.importance.keep`.  The same scores then weigh the kept entries' steps
    (unless ``importance="none"``), whatever the profile says: ``--keep F`` alone writes
    what ``--keep F --importance SCORER`` writes.

    ``chunk_tokens``: positions per independently decodable chunk; by default
    ``DEFAULT_CHUNK_TOKENS``, and with ``keep`` about ``DEFAULT_CHUNK_TOKENS / keep`` so
    that a pruned chunk holds as many entries as a dense one (:func:`kvzip.levels.chunk_span`).

    Lossy levels use the model's calibration profile (``profile``: a file or a
    digest; by default the newest one for the model in the profile directories).
    With none, ``if_no_profile`` picks: ``"calibrate"`` builds and stores one
    first, ``"uncalibrated"`` uses the uncalibrated codec, ``"error"`` refuses.

    The cache is coded chunk by chunk while the model produces it.  ``prefill_cache``:
    where the model keeps its own cache meanwhile: ``"memory"``, ``"disk"`` (unlinked files
    beside ``out``, for a CPU whose memory cannot hold it; the file is the same), or
    ``"auto"``: disk when the model runs on the CPU and its cache would take more than half
    the memory limit (``--max-memory``; default half of RAM).  Scoring (``importance``,
    ``keep``) needs the whole cache in memory: with ``"disk"`` it is refused, and where the
    cache goes to disk, or on the CPU where the scored copy and the model's cache would
    take more than half the memory limit, the default importance (a profile's, or the
    uncalibrated levels') is not applied (the file is coded uniformly, and the summary's
    ``importance`` says None).
    """
    check_levels(levels)
    check_if_missing(if_no_profile)
    keep_scorer = scoring.check_options(importance, keep, keep_rule, keep_by)  # before the model loads
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise InputError(f"--chunk-tokens must be positive, got {chunk_tokens}")
    chunk_tokens = chunk_span(chunk_tokens, keep)
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if prefill_cache not in PREFILL_CACHE_CHOICES:
        raise InputError(f"--prefill-cache must be one of {', '.join(PREFILL_CACHE_CHOICES)}, got {prefill_cache!r}")
    km = load_model(model, device=device, model_dtype=model_dtype)
    km.check_text_size(len(text), unit="characters")  # refused before tokenizing it all
    template = km.chat_template() if chat else None
    if chat and template is None:
        raise InputError(f"{km.name} has no usable chat template; encode without --chat")
    ids = km.document_ids(text, template)
    km.check_length(len(ids))
    resolved = resolve(levels, km, profile, if_missing=if_no_profile, progress=progress)
    started = time.perf_counter()
    classes = extra = None
    pairs = resolved.pairs()
    weigh_by = scoring.weighing(importance, resolved.importance, keep_scorer if keep is not None else None)
    on_disk = _offload_prefill(km, len(ids), prefill_cache)
    scoring_asked = keep is not None or scoring.is_asked(importance)
    if on_disk and scoring_asked and prefill_cache == "disk":
        raise InputError("--importance and --keep score the whole cache in memory; drop --prefill-cache disk")
    if not scoring_asked and (on_disk or not _scoring_fits(km, len(ids))):
        weigh_by = None  # the default importance would hold the whole cache: too big here
    if weigh_by is None and keep is None:
        # coded chunk by chunk as the model produces it: the host holds a few chunks
        offload = Path(out).resolve().parent if on_disk else None
        kv = stream_prefill(km, ids, chunk_tokens, progress, offload=offload)
    else:
        progress("score", 0, 1)
        # one pass serves both: with --keep its scorer's scores also weigh the steps
        scored = scoring.score(km, ids, keep_scorer if keep is not None else weigh_by)
        # (weigh_by is None or that scorer: check_options refuses two names, weighing picks it)
        progress("score", 1, 1)
        used = scoring.apply(scored, pairs, resolved.profile, weigh=weigh_by is not None,
                             keep=keep, keep_rule=keep_rule)
        kv, classes, pairs, extra = used.kv, used.classes, used.pairs, used.header
        weigh_by = used.weighed_by
    prefill_seconds = time.perf_counter() - started
    chat_info = None if template is None else ChatInfo(template.prefix, template.separator, template.suffix)
    source = None if not source_name else SourceInfo(source_name, hashlib.sha256(text.encode()).hexdigest())
    summary = write_kvz(
        kv, ids, out, km, levels=pairs, chunk_tokens=chunk_tokens,
        dtype=dtype or km.dtype, chat=chat_info, source=source, profile=resolved.profile,
        progress=progress, importance=classes, extra_header=extra,
    )
    summary.prefill_seconds += prefill_seconds
    summary.importance = weigh_by
    return summary


PREFILL_CACHE_CHOICES = ("auto", "memory", "disk")


def _offload_prefill(km: KVModel, n_tokens: int, choice: str) -> bool:
    """Whether the prefill keeps the model's cache on disk (see :func:`encode`)."""
    if choice != "auto":
        return choice == "disk"
    if km.device.type != "cpu":
        return False  # the model's cache is device memory; the host holds a few chunks
    return _cache_bytes(km, n_tokens) > memory_limit() // 2


def _scoring_fits(km: KVModel, n_tokens: int) -> bool:
    """Whether scoring ``n_tokens`` in memory stays within half the memory limit on the
    CPU: it holds the model's cache and the captured copy it scores (measured at
    Llama-3-8B geometry, 8K tokens: 2.0 times the cache above a short encode)."""
    return km.device.type != "cpu" or 2 * _cache_bytes(km, n_tokens) <= memory_limit() // 2


def _cache_bytes(km: KVModel, n_tokens: int) -> int:
    """The model's own cache of ``n_tokens``, in its dtype."""
    itemsize = km.model.dtype.itemsize
    return 2 * km.kv_heads * km.head_dim * itemsize * sum(km.kept_positions(n_tokens))


# --------------------------------------------------------------------- inspect
def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a ``.kvz`` holds: model, geometry, levels with sizes and ratios."""
    with open_kvz(path) as reader:
        h = reader.header
        context_elements = 2 * h.num_layers * h.kv_heads * h.token_count * h.head_dim
        elements = 2 * h.layout.stored() * h.head_dim  # what the file holds (all, when dense)
        raw = elements * STORAGE_DTYPES[h.dtype].itemsize
        file_bytes = reader.source.size()
        levels = []
        for level in h.levels:
            payload = sum(e.length for e in reader.kv_entries(level.name))
            classes = None
            if level.codec.get("importance_factors"):
                try:  # entropy-decodes the level's chunks: only files coded by class pay for it
                    classes = CacheFile(reader).class_bits(level.name)
                except KvzipError:  # e.g. its calibration profile is not on this machine
                    classes = None
            levels.append(
                {
                    "name": level.name,
                    "codec": level.codec,
                    "payload_bytes": payload,
                    "bits_per_element": round(payload * 8 / elements, 4),
                    "bits_per_context_element": round(payload * 8 / context_elements, 4),
                    "ratio": round(raw / payload, 4) if payload else None,
                    "importance_classes": classes,
                }
            )
        return {
            "path": str(path),
            "format_version": f"{reader.version[0]}.{reader.version[1]}",
            "kvzip_version": h.kvzip_version,
            "created": h.created,
            "model": h.model.to_json(),
            "num_layers": h.num_layers,
            "kv_heads": h.kv_heads,
            "head_dim": h.head_dim,
            "dtype": h.dtype,
            "tokens": h.token_count,
            "chunk_tokens": h.chunk_tokens,
            "chunks": len(reader.kv_entries(h.levels[0].name)),
            "chat": h.chat is not None,
            "rope": h.rope_inv_freq is not None,
            "levels": levels,
            "raw_bytes": raw,
            "file_bytes": file_bytes,
            "ratio": round(raw / file_bytes, 4),
            "bits_per_element": round(file_bytes * 8 / elements, 4),
            "bits_per_context_element": round(file_bytes * 8 / context_elements, 4),
            "stored_elements": elements,
            "context_elements": context_elements,
            "layout": _layout_info(h),
            "importance": h.raw.get("importance") if isinstance(h.raw.get("importance"), dict) else None,
            "keep": h.raw.get("keep") if isinstance(h.raw.get("keep"), dict) else None,
            "source": None if h.source is None else {"name": h.source.name, "sha256": h.source.sha256},
            "profile": _profile_info(h.levels),
        }


def _layout_info(h: Any) -> dict[str, Any]:
    """Which positions the layers hold, by layer type: every one (dense), or a window."""
    attention = h.raw.get("attention") if isinstance(h.raw.get("attention"), dict) else {}
    types = attention.get("layer_types")
    if not (isinstance(types, list) and len(types) == h.num_layers and all(isinstance(t, str) for t in types)):
        types = ["full_attention"] * h.num_layers if h.is_dense else ["layer"] * h.num_layers
    groups: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(types):
        g = groups.setdefault(kind, {"layers": [], "stored_positions": []})
        g["layers"].append(i)
        g["stored_positions"].append(sum(int(p.size) for p in h.layout.positions[i]) // h.kv_heads)
    by_type = []
    for kind, g in groups.items():
        stored = sorted(set(g["stored_positions"]))
        by_type.append({"type": kind, "layers": len(g["layers"]),
                        "tokens_stored": stored[0] if len(stored) == 1 else stored})
    return {"dense": h.is_dense, "features": list(h.features), "by_type": by_type}


def _profile_info(levels) -> dict[str, Any] | None:
    """The calibration profile a file's levels name, and whether this machine has it."""
    digests = {lv.profile for lv in levels if lv.profile is not None}
    if not digests:
        return None
    digest = sorted(digests)[0]
    out: dict[str, Any] = {"digest": digest, "available": False}
    try:
        prof = find_profile(digest)
    except KvzipError as exc:
        out["problem"] = str(exc)
        return out
    out.update(available=True, path=str(prof.path) if prof.path else None, bytes=prof.size,
               calibration_tokens=prof.meta.get("calibration_tokens"))
    return out


@dataclass
class VerifyReport:
    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked_payloads: int = 0


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check the header, index and every payload checksum; decode every chunk."""
    with open_cache(path) as cache:
        problems = [p.message for p in cache.verify(decode=True)]
        return VerifyReport(str(path), not problems, problems, len(cache.entries))


# ---------------------------------------------------------------------- decode
@dataclass
class DecodeSummary:
    path: str
    out: str
    tokens: int
    level: str
    seconds: float


def decode(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    level: str | None = None,
    progress: Progress = no_progress,
) -> DecodeSummary:
    """Decode a ``.kvz`` into a safetensors file (``layers.{i}.key/value/positions``,
    ``token_ids``).

    ``layers.{i}.key`` / ``.value`` are [kv_heads, n, head_dim] exactly as the model's
    cache holds them (keys after RoPE), and ``layers.{i}.positions`` [kv_heads, n]
    (int64) says which context position each of the n entries is: 0..T-1 for a layer
    that keeps everything, the last ``window - 1`` for a sliding-window layer.  A head
    holding fewer entries than its layer's widest is padded at the end with zeros at
    position -1.  Other programs rely on this contract (``docs/format.md``).
    """
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    loaded = load_kv(path, level, progress)
    kv, ids, header = loaded.kv, loaded.token_ids, loaded.header
    tensors: dict[str, torch.Tensor] = {"token_ids": torch.tensor(ids, dtype=torch.int64)}
    for i, layer in enumerate(kv.layers):
        tensors[f"layers.{i}.key"] = layer[0].contiguous()
        tensors[f"layers.{i}.value"] = layer[1].contiguous()
        tensors[f"layers.{i}.positions"] = torch.from_numpy(kv.layout.layer_positions(i))
    metadata = {
        "format": "kvzip-decoded",
        "model_fingerprint": header.model_fingerprint,
        "level": loaded.level,
        "dtype": header.dtype,
    }
    write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return DecodeSummary(str(path), str(out), len(ids), loaded.level, time.perf_counter() - started)


# -------------------------------------------------------------------- generate
@dataclass
class GenerateResult:
    text: str
    new_token_ids: list[int]
    cached_tokens: int
    prompt_tokens: int
    level: str
    decode_seconds: float  # .kvz -> tensor
    first_token_seconds: float  # decode + attach + first new token
    total_seconds: float
    # Filled only with compare=True: the same generation from the text, no cache.
    baseline_first_token_seconds: float | None = None
    baseline_total_seconds: float | None = None
    baseline_identical: bool | None = None


def generate(
    path: str | os.PathLike[str],
    prompt: str,
    *,
    model: ModelLike = None,
    max_new_tokens: int = 64,
    level: str | None = None,
    compare: bool = False,
    device: str | torch.device | None = None,
    model_dtype: str | torch.dtype | None = None,
    progress: Progress = no_progress,
) -> GenerateResult:
    """Attach the cache stored in ``path`` to the model and continue after ``prompt``
    (``device`` and ``model_dtype``: where and in what dtype a model given by name runs)."""
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    km = load_model(model, device=device, model_dtype=model_dtype)
    with open_kvz(path) as reader:
        km.check_stored_cache(reader.header)
        from kvzip.model import ChatTemplate

        chat = ChatTemplate.from_info(reader.header.chat)
    prompt_ids = km.prompt_ids(prompt, chat)
    started = time.perf_counter()
    if prompt_ids:  # decoded straight into the model's cache: the cache is held once
        attached = attach_kv(path, km, level, room=len(prompt_ids) + max_new_tokens)
        doc_ids, level_name, cache, kv = attached.token_ids, attached.level, attached.cache, None
    else:  # the last cached token must be read again: decoded, then cropped by one
        loaded = load_kv(path, level, progress)
        doc_ids, level_name, cache, kv = loaded.token_ids, loaded.level, None, loaded.kv
    decode_seconds = time.perf_counter() - started
    ids = doc_ids + prompt_ids
    offset = time.perf_counter() - started
    run = km.generate_timed(ids, kv=kv, cache=cache, max_new_tokens=max_new_tokens)
    del cache, kv
    result = GenerateResult(
        text=km.decode_ids(run.new_ids),
        new_token_ids=run.new_ids,
        cached_tokens=len(doc_ids),
        prompt_tokens=len(prompt_ids),
        level=level_name,
        decode_seconds=decode_seconds,
        first_token_seconds=offset + run.first_token_seconds,
        total_seconds=offset + run.total_seconds,
    )
    if compare:
        progress("baseline", 0, 1)
        base = km.generate_timed(ids, max_new_tokens=max_new_tokens)
        result.baseline_first_token_seconds = base.first_token_seconds
        result.baseline_total_seconds = base.total_seconds
        result.baseline_identical = base.new_ids == run.new_ids
        progress("baseline", 1, 1)
    return result


def is_url(source: str | os.PathLike[str]) -> bool:
    return str(source).startswith(("http://", "https://"))


def generate_url(
    url: str,
    prompt: str,
    *,
    model: ModelLike = None,
    max_new_tokens: int = 64,
    deadline: float | None = None,
    level: str | None = None,
    limits: DownloadLimits = DownloadLimits(),
    device: str | torch.device | None = None,
    model_dtype: str | torch.dtype | None = None,
    progress: Progress = no_progress,
) -> StreamResult:
    """Stream a context from ``url`` (adapting quality to ``deadline``) and generate after ``prompt``.

    ``limits`` bound the download (overall time, minimum speed, redirects to other
    hosts), as for :func:`fetch`."""
    from kvzip.stream.client import stream_generate

    return stream_generate(
        url, prompt, load_model(model, device=device, model_dtype=model_dtype), deadline=deadline, max_new_tokens=max_new_tokens,
        levels=None if level is None else [level], limits=limits, progress=progress,
    )
