"""The quality protocol of DESIGN.md, as ``kvzip bench`` runs it.

For each real text: prefill the first ``prefix`` tokens, capture the cache, write
it through each method into a real ``.kvz`` (or, for the KIVI-style baselines,
quantize it and count the size it would take), decode it, then teacher-force the
next ``cont`` tokens twice — with the original cache and with the decoded one —
and compare the next-token distributions.

Reported per text and averaged: bits per KV element (whole file bytes × 8 / number
of K and V scalars), KL(original ‖ decoded) in nats/token, relative perplexity
change in percent, top-1 agreement, encode and decode throughput, and time to first
token from the ``.kvz`` against a fresh prefill of the text.

The lossy levels use the model's calibration profile (:func:`kvzip.levels.resolve`);
the texts scored must not be among the profile's calibration texts.  With a profile,
the profile's size and its break-even (tokens of ``.kvz`` that pay for shipping it)
are reported against the uncalibrated level of the same name.

Two optional sections:

* **sweep** — each method's rate–quality curve, every point scored like a row:
  the calibrated kvzip codec with ``balanced``'s step scaled by :data:`STEP_FACTORS`,
  ``cachegen`` with its bins scaled by :data:`CACHEGEN_BIN_FACTORS`, and KIVI-style
  int2/3/4/8 (group 32);
* **speed** — at each of ``lengths`` tokens (taken from the texts put end to end):
  encode and decode throughput (file → tensor), peak memory of the decoding process
  beside the decoded cache in fp32, and time to first token
  from the local ``.kvz`` against a fresh prefill of the same tokens.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import statistics
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvzip import api
from kvzip import importance as scoring
from kvzip.atomic import write_atomic
from kvzip.codecs import Codec, codec_from_config, codec_ids
from kvzip.codecs.entropy import clear_model_caches
from kvzip.codecs.profile import Profile
from kvzip.errors import InputError
from kvzip.formats import LayeredKV
from kvzip.importance.keep import check_keep
from kvzip.levels import (
    DEFAULT_LEVEL,
    LEVELS,
    check_level,
    chunk_span,
    codec_for_level,
    is_calibrated,
    level_config,
    level_importance,
    resolve,
    threads_for,
)
from kvzip.model import KVModel

Progress = Callable[[str, int, int], None]


def default_texts() -> list[Path]:
    """Real texts already on the machine that no one on the project wrote.

    None of them is among :func:`kvzip.levels.calibrate.default_calibration_texts`
    (they are ``kvzip.levels.calibrate.BENCH_TEXT_NAMES``).
    """
    import argparse
    import typing

    candidates = [
        Path("/usr/share/common-licenses/GPL-3"),
        Path("/usr/share/common-licenses/GPL-2"),
        Path("/usr/share/common-licenses/GFDL-1.3"),
        Path(argparse.__file__),
        Path(typing.__file__),
    ]
    return [p for p in candidates if p.is_file()]


# Baselines that are not stored codecs: (name, bits, what they are).
KIVI_BASELINES = {"kivi-int4": 4, "kivi-int2": 2}
DEFAULT_CODECS = ("cachegen",)
UNCAL_SUFFIX = "-uncal"

# The sweep: factors on the step of SWEEP_LEVEL (kvzip), on cachegen's bins, KIVI bits.
SWEEP_LEVEL = "balanced"
STEP_FACTORS = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
CACHEGEN_BIN_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
KIVI_SWEEP_BITS = (2, 3, 4, 8)
DEFAULT_LENGTHS = (2048, 4096, 8192)


@dataclass
class BenchRow:
    text: str
    method: str
    bits_per_element: float
    kl: float  # nats per token
    dppl_pct: float
    top1: float
    encode_meps: float | None  # million elements per second
    decode_meps: float | None
    ttft_kvz_s: float | None  # decode + attach + first token
    ttft_prefill_s: float  # prefill of the text + first token
    file_bytes: int | None


@dataclass
class SweepPoint:
    """One point of a method's rate–quality curve."""

    text: str
    curve: str  # "kvzip", "kvzip-uncal", "cachegen", "kivi"
    setting: float  # step factor, bins factor, or KIVI bits
    label: str  # the setting in words, e.g. "step×0.5", "bins×2", "int4"
    bits_per_element: float
    kl: float
    dppl_pct: float
    top1: float
    file_bytes: int | None


@dataclass
class SpeedRow:
    """Decode speed, decode memory and time to first token at one context length."""

    tokens: int
    level: str
    codec: str
    bits_per_element: float
    file_bytes: int
    encode_meps: float  # codec encode, after prefill
    decode_meps: float  # file -> tensor, cold: empty model caches
    decode_warm_meps: float  # the same file again, caches warm
    decoders: int
    # RSS high-water mark above the start (DecodeMemory), and never less than the
    # decoded tensor itself
    peak_decode_bytes: int
    cache_fp32_bytes: int
    peak_ratio: float  # peak_decode_bytes / cache_fp32_bytes
    peak_method: str  # "hwm" (kernel high-water marks) or "sampled"
    ttft_kvz_s: float  # cold decode + first token
    ttft_prefill_s: float  # prefill of the same tokens + first token
    ttft_speedup: float


@dataclass
class ImportanceRow:
    """One level coded by importance: its steps weighted by a scorer's classes
    (``mode="importance"``), its entries dropped to a fraction by the scorer
    (``mode="keep"``), or both: dropped, and the entries kept weighted by their classes
    among themselves (``mode="keep+importance"``), on the quality protocol."""

    text: str
    level: str
    scorer: str
    mode: str  # "importance" | "keep" | "keep+importance"
    keep: float | None  # the fraction kept (keep rows)
    rule: str | None  # the budget rule (keep rows)
    bits_per_element: float  # file bits per element the file stores
    bits_per_context_element: float  # file bits per element of the whole context's cache
    kl: float
    dppl_pct: float
    top1: float
    file_bytes: int
    kept_fraction: float  # entries stored / entries the cache held

    @property
    def method(self) -> str:
        if self.mode == "importance":
            return f"{self.level} +{self.scorer}"
        weighed = " +weighed" if self.mode == "keep+importance" else ""
        return f"{self.level} keep {self.keep:g} {self.rule} by {self.scorer}{weighed}"


@dataclass
class ProfileReport:
    """The calibration profile the levels used, and what it costs to ship."""

    digest: str
    bytes: int
    path: str | None
    calibration_texts: list[str]
    # the scorer the calibrated level rows spent their bits by, as encode does with this
    # profile (its calibration's quality check; None: uniform precision)
    importance: str | None = None
    # level -> {"saved_bytes_per_token": mean over texts, "break_even_tokens": int or "none"}
    break_even: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    sweep: list[SweepPoint]
    speed: list[SpeedRow]
    profile: ProfileReport | None
    texts: list[str]  # file names of the texts the quality rows scored
    speed_texts: list[str] = field(default_factory=list)  # put end to end for the speed section
    importance: list[ImportanceRow] = field(default_factory=list)


@dataclass
class QualityScore:
    kl: float
    dppl_pct: float
    top1: float


def score(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> QualityScore:
    """KL(ref ‖ test) per position, relative perplexity change and top-1 agreement."""
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    logp = torch.log_softmax(logits.double(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    nll_ref = -ref_logp.gather(1, targets[:, None]).mean().item()
    nll = -logp.gather(1, targets[:, None]).mean().item()
    dppl = (math.exp(nll - nll_ref) - 1.0) * 100.0
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return QualityScore(max(kl, 0.0), dppl, top1)


def kivi_roundtrip(kv: torch.Tensor | LayeredKV, bits: int, group: int = 32) -> tuple[Any, float]:
    """KIVI-style asymmetric quantization, and the bits per element it would take.

    Keys are quantized per channel (groups of ``group`` tokens), values per token
    (groups of ``group`` channels); each group stores an fp16 scale and zero point.
    KIVI's full-precision window of recent tokens is not modelled.  A cache with a
    position layout is quantized layer by layer, over the tokens each layer holds.
    """
    if isinstance(kv, LayeredKV):
        if kv.is_dense:
            out, bpe = kivi_roundtrip(kv.dense, bits, group)
            return LayeredKV.from_dense(out), bpe
        parts = [kivi_roundtrip(layer[:, None], bits, group) for layer in kv.layers]
        total = sum(bpe * layer.numel() for (_, bpe), layer in zip(parts, kv.layers))
        return LayeredKV([q[:, 0] for q, _ in parts], kv.layout), total / kv.elements()
    keys, values = kv[0].float(), kv[1].float()
    L, H, T, D = keys.shape
    pad = (-T) % group
    k = torch.nn.functional.pad(keys, (0, 0, 0, pad)).reshape(L, H, -1, group, D)
    k_hat = _fake_quant(k, bits, dim=3).reshape(L, H, T + pad, D)[:, :, :T]
    pad_d = (-D) % group
    v = torch.nn.functional.pad(values, (0, pad_d)).reshape(L, H, T, -1, group)
    v_hat = _fake_quant(v, bits, dim=4).reshape(L, H, T, D + pad_d)[..., :D]
    groups = L * H * D * math.ceil(T / group) + L * H * T * math.ceil(D / group)
    bits_total = 2 * L * H * T * D * bits + groups * 32
    return torch.stack([k_hat, v_hat]).to(kv.dtype), bits_total / kv.numel()


def _fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    # fp16 scales as KIVI stores them; a constant group's zero range stays a (tiny) positive
    # scale after the cast (1e-8 itself would round to 0 in fp16, and 0/0 to NaN)
    scale = ((hi - lo) / (2**bits - 1)).half().float().clamp_min(1e-8)
    lo = lo.half().float()
    q = ((x - lo) / scale).round().clamp(0, 2**bits - 1)
    return q * scale + lo


@dataclass
class BenchConfig:
    texts: Sequence[Path]
    levels: Sequence[str]
    codecs: Sequence[str]
    prefix: int = 2048
    cont: int = 384
    chunk_tokens: int | None = None  # None: chunk_span's default (wider for the --keep rows)
    baselines: bool = True
    profile: str | os.PathLike[str] | None = None  # a .kvzprofile file or a digest
    if_no_profile: str = "calibrate"  # "calibrate" | "uncalibrated" | "error"
    uncalibrated: bool = False  # also rows "<level>-uncal" (and the uncalibrated sweep curve)
    sweep: bool = False
    quality: bool = True  # False: the speed section only
    lengths: Sequence[int] = ()  # the speed section's context lengths (none: no speed section)
    speed_level: str = DEFAULT_LEVEL
    decoders: int | None = None  # decode threads in the speed section (None: kvzip's default)
    # The importance section: per scorer, each level with importance-weighted steps, and
    # with its entries dropped to each fraction of ``keeps`` under each rule of ``keep_rules``.
    scorers: Sequence[str] = ()
    keeps: Sequence[float] = ()
    keep_rules: Sequence[str] = ("shared",)
    keep_weigh: bool = False  # each keep row also once with the kept entries' steps weighted
    # the calibrated level rows at uniform precision even where the profile has the levels
    # spend bits by importance (by default they are coded as `kvzip encode` codes them)
    uniform: bool = False


def resolve_codecs(names: Sequence[str], profile: Profile | None = None) -> list[tuple[str, Codec]]:
    """Codec ids (default config) or level names -> (row name, codec).

    Levels are calibrated with ``profile`` when they have a calibrated form.
    """
    out = []
    for name in names:
        if name in LEVELS:
            out.append((name, codec_for_level(name, profile)))
        else:
            out.append((name, codec_from_config({"id": name})))
    return out


def calibration_text_names(profile: Profile) -> set[str]:
    """File names of the texts ``profile`` was calibrated on."""
    names = set()
    for entry in profile.meta.get("texts") or []:
        name = entry.get("name") if isinstance(entry, dict) else entry
        if isinstance(name, str) and name:
            names.add(Path(name).name)
    return names


def check_no_overlap(texts: Sequence[Path], profile: Profile | None) -> None:
    """Refuse evaluation texts the profile was calibrated on."""
    if profile is None:
        return
    seen = calibration_text_names(profile)
    for path in texts:
        if Path(path).name in seen:
            raise InputError(
                f"{path}: {Path(path).name} is a calibration text of profile {profile.digest[:12]}; "
                "benchmark on texts the profile was not calibrated on"
            )


def sweep_methods(profile: Profile | None, uncalibrated: bool,
                  cachegen: bool = True) -> list[tuple[str, float, str, Codec]]:
    """The stored codecs of the sweep: (curve, setting, label, codec)."""
    out: list[tuple[str, float, str, Codec]] = []
    if profile is not None and is_calibrated(SWEEP_LEVEL):
        base = level_config(SWEEP_LEVEL, profile.digest)
        for f in STEP_FACTORS:
            cfg = {**base, "step": base["step"] * f}
            out.append(("kvzip", f, f"step×{f:g}", codec_from_config(cfg, profile)))
    if profile is None or uncalibrated:
        base = dict(LEVELS[SWEEP_LEVEL])
        curve = "kvzip" if profile is None else f"kvzip{UNCAL_SUFFIX}"
        for f in STEP_FACTORS:
            cfg = dict(base)
            for key in ("key_step", "value_step", "step"):
                if key in cfg:
                    cfg[key] = cfg[key] * f
            out.append((curve, f, f"step×{f:g}", codec_from_config(cfg)))
    if cachegen and "cachegen" in codec_ids():
        defaults = codec_from_config({"id": "cachegen"}).params()
        for f in CACHEGEN_BIN_FACTORS:
            cfg = {"id": "cachegen", **defaults}
            for key in ("key_bins_early", "key_bins", "value_bins_early", "value_bins"):
                cfg[key] = max(4, int(round(defaults[key] * f)))
            out.append(("cachegen", f, f"bins×{f:g}", codec_from_config(cfg)))
    return out


def run_bench(km: KVModel, config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """Run the protocol on every text (one row per (text, method)), then the sweep and speed sections."""
    for level in [*config.levels, *([config.speed_level] if config.lengths else [])]:
        check_level(level)
    if not config.quality and not config.lengths:
        raise InputError("nothing to run: the speed section needs --lengths")
    if not config.quality and config.sweep:
        raise InputError("--sweep is part of the quality protocol; drop --speed-only")
    if not config.texts:
        raise InputError("no text to benchmark on")
    lengths = [int(n) for n in config.lengths]
    if any(n < 2 for n in lengths):
        raise InputError(f"--lengths must be at least 2 tokens each, got {','.join(map(str, lengths))}")

    used_levels = [*(config.levels if config.quality else []), *([SWEEP_LEVEL] if config.sweep else []),
                   *([config.speed_level] if lengths else [])]
    profile = None
    if used_levels:  # one profile for every level the run codes (found, made, or none)
        profile = resolve(used_levels, km, config.profile, config.if_no_profile, progress).profile
    check_no_overlap(config.texts, profile)

    rows: list[BenchRow] = []
    sweep: list[SweepPoint] = []
    uncal_sizes: dict[str, list[tuple[int, int]]] = {}  # level -> [(cal bytes, uncal bytes)] per text
    used_texts: list[str] = []
    importance_rows: list[ImportanceRow] = []
    for name in config.scorers:
        scoring.scorer(name)
    for f in config.keeps:
        check_keep(f, "shared")
    for rule in config.keep_rules:
        check_keep(None, rule)
    with tempfile.TemporaryDirectory(prefix="kvzip-bench-") as tmp:
        if config.quality:
            methods = resolve_codecs(config.codecs) + resolve_codecs(config.levels, profile)
            calibrated = [lv for lv in config.levels if profile is not None and is_calibrated(lv)]
            uncal = [(f"{lv}{UNCAL_SUFFIX}", codec_for_level(lv)) for lv in calibrated]
            sweeps = sweep_methods(profile, config.uncalibrated) if config.sweep else []
            need = config.prefix + config.cont + 1
            usable = []
            for path in config.texts:
                ids = km.document_ids(api.read_text(path), None)
                if len(ids) < need:
                    continue
                usable.append((path, ids[:need]))
            if not usable:
                raise InputError(
                    f"no text has the {need} tokens the protocol needs (prefix {config.prefix} + "
                    f"continuation {config.cont} + 1)"
                )
            per_text = (len(methods) + len(uncal) + (4 if config.baselines else 0)
                        + (len(sweeps) + len(KIVI_SWEEP_BITS) if config.sweep else 0)
                        + len(config.scorers) * len(config.levels)
                        * (1 + len(config.keeps) * len(config.keep_rules) * (1 + config.keep_weigh)))
            ticker = _Ticker(progress, "bench", len(usable) * per_text)
            for path, ids in usable:
                used_texts.append(path.name)
                text_rows, points, sizes, weighed = _bench_text(
                    km, config, path, ids, methods, uncal, sweeps, Path(tmp), ticker.tick, profile)
                rows.extend(text_rows)
                importance_rows.extend(weighed)
                sweep.extend(points)
                for level, pair in sizes.items():
                    uncal_sizes.setdefault(level, []).append(pair)
        speed, speed_texts = run_speed(km, config, profile, Path(tmp), progress) if lengths else ([], [])
    report = None
    if profile is not None:
        report = ProfileReport(
            digest=profile.digest, bytes=profile.size,
            path=str(profile.path) if profile.path is not None else None,
            calibration_texts=sorted(calibration_text_names(profile)),
            importance=_weigh_by(profile, config),
            break_even={level: break_even(profile.size, pairs, config.prefix)
                        for level, pairs in uncal_sizes.items()},
        )
    return BenchResult(rows, sweep, speed, report, used_texts, speed_texts, importance_rows)


def break_even(profile_bytes: int, pairs: Sequence[tuple[int, int]], tokens: int) -> dict[str, Any]:
    """Tokens of ``.kvz`` at which the profile pays for itself when shipped alongside.

    ``pairs`` are (calibrated file bytes, uncalibrated file bytes) of the same
    ``tokens``-token cache; the saving per token is averaged over them.
    """
    saved = statistics.fmean((u - c) / tokens for c, u in pairs)
    return {
        "saved_bytes_per_token": saved,
        "break_even_tokens": math.ceil(profile_bytes / saved) if saved > 0 else "none",
    }


class _Ticker:
    def __init__(self, progress: Progress | None, stage: str, total: int):
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)


def _weigh_by(profile: Profile | None, config: BenchConfig) -> str | None:
    """The scorer the lossy levels coded with ``profile`` (None: the uncalibrated codecs)
    are weighted by, as `kvzip encode` codes them (:func:`kvzip.levels.level_importance`),
    unless ``config.uniform``."""
    return None if config.uniform else level_importance(profile)


def _profile_classes(km: KVModel, ids: Sequence[int], weigh_by: str | None,
                     together: bool = False) -> list[np.ndarray] | None:
    """The importance classes of the entries of ``ids``'s cache by ``weigh_by`` (None: none),
    a position's for all of a layer's heads when ``together``.  They are computed by a
    prefill of their own, and applied to the reference prefill's cache (the two can differ
    by float rounding, since their attention is computed another way)."""
    if weigh_by is None:
        return None
    return scoring.classes(scoring.score(km, ids, weigh_by).scores, heads_together=together)


def _as_encoded(codec: Codec, profile: Profile | None, config: BenchConfig,
                classes: Callable[[str, bool], list[np.ndarray] | None]) -> tuple[Codec, list[np.ndarray] | None]:
    """``codec`` and the classes to write it with, as `kvzip encode` does: one of kvzip's
    lossy codecs weighted by the scorer its profile names (a calibrated codec) or the
    uncalibrated levels' (:func:`_weigh_by`), with ``classes(scorer, heads_together)``; any
    other codec, or with ``config.uniform``, as it is (and no scoring pass)."""
    by = _weigh_by(profile if codec.needs_profile else None, config)
    coded = None if by is None else scoring.weighted(codec, profile)
    if coded is None or coded is codec:  # uniform; lossless and the references always
        return codec, None
    return coded, classes(by, not coded.codes_heads_apart())


def _bench_text(
    km: KVModel,
    config: BenchConfig,
    path: Path,
    ids: list[int],
    methods: list[tuple[str, Codec]],
    uncal: list[tuple[str, Codec]],
    sweeps: list[tuple[str, float, str, Codec]],
    tmp: Path,
    tick: Callable[[], None],
    profile: Profile | None = None,
) -> tuple[list[BenchRow], list[SweepPoint], dict[str, tuple[int, int]], list[ImportanceRow]]:
    P = config.prefix
    started = time.perf_counter()
    kv = km.prefill(ids[:P])
    ref_first = km.teacher_force(kv, ids[P : P + 1])
    ttft_prefill = time.perf_counter() - started
    del ref_first
    follow = ids[P : P + config.cont]
    targets = torch.tensor(ids[P + 1 : P + config.cont + 1])
    ref_logits = km.teacher_force(kv, follow)
    numel = kv.elements()  # stored elements: a sliding layer counts its window
    name = path.name
    rows = []

    def quality(decoded: LayeredKV) -> QualityScore:
        s = score(ref_logits, km.teacher_force(decoded, follow), targets)
        tick()
        return s

    def row(method: str, decoded: LayeredKV, bits: float, **extra: Any) -> BenchRow:
        s = quality(decoded)
        return BenchRow(
            text=name, method=method, bits_per_element=bits, kl=s.kl, dppl_pct=s.dppl_pct,
            top1=s.top1, ttft_prefill_s=ttft_prefill,
            **{"encode_meps": None, "decode_meps": None, "ttft_kvz_s": None, "file_bytes": None,
               **extra},
        )

    @functools.cache
    def classes_by(scorer: str, together: bool) -> list[np.ndarray] | None:  # each pass once per text
        return _profile_classes(km, ids[:P], scorer, together)

    def as_encoded(codec: Codec) -> tuple[Codec, list[np.ndarray] | None]:
        return _as_encoded(codec, profile, config, classes_by)

    def roundtrip(method: str, codec: Codec, dtype: str) -> tuple[LayeredKV, dict[str, Any]]:
        out = tmp / f"{name}.{method}.kvz"
        codec, by_class = as_encoded(codec)
        summary = api.write_kvz(
            kv, ids[:P], out, km, levels=[(method, codec)], chunk_tokens=chunk_span(config.chunk_tokens),
            dtype=dtype, importance=by_class,
        )
        t0 = time.perf_counter()
        decoded = api.load_kv(out).kv
        decode_s = time.perf_counter() - t0
        km.teacher_force(decoded, ids[P : P + 1])
        ttft = time.perf_counter() - t0
        file_bytes = out.stat().st_size
        out.unlink()
        return decoded, dict(
            encode_meps=numel / summary.encode_seconds / 1e6,
            decode_meps=numel / decode_s / 1e6, ttft_kvz_s=ttft, file_bytes=file_bytes,
        )

    def stored(method: str, codec: Codec, dtype: str) -> BenchRow:
        decoded, extra = roundtrip(method, codec, dtype)
        return row(method, decoded, extra["file_bytes"] * 8 / numel, **extra)

    if config.baselines:
        rows.append(row("fp16", kv.map(lambda t: t.half().float()), 16.0))
        rows.append(stored("zstd-fp16", codec_for_level("lossless"), "float16"))
        for method, bits in KIVI_BASELINES.items():
            decoded, bpe = kivi_roundtrip(kv, bits)
            rows.append(row(method, decoded, bpe))
    for method, codec in methods:
        rows.append(stored(method, codec, "float32"))
    # The uncalibrated form of each calibrated level: its size for the profile's
    # break-even always, a full row with --uncalibrated.
    sizes: dict[str, tuple[int, int]] = {}
    by_method = {r.method: r for r in rows}
    for method, codec in uncal:
        level = method.removesuffix(UNCAL_SUFFIX)
        if config.uncalibrated:
            r = stored(method, codec, "float32")
            rows.append(r)
            uncal_bytes = r.file_bytes
        else:
            out = tmp / f"{name}.{method}.kvz"
            coded, by_class = as_encoded(codec)
            api.write_kvz(kv, ids[:P], out, km, levels=[(method, coded)],
                          chunk_tokens=chunk_span(config.chunk_tokens), dtype="float32", importance=by_class)
            uncal_bytes = out.stat().st_size
            out.unlink()
            tick()
        cal = by_method.get(level)
        if cal is not None and cal.file_bytes is not None and uncal_bytes is not None:
            sizes[level] = (cal.file_bytes, uncal_bytes)

    points: list[SweepPoint] = []
    if config.sweep:
        for curve, setting, label, codec in sweeps:
            decoded, extra = roundtrip(f"sweep-{len(points)}", codec, "float32")
            s = quality(decoded)
            points.append(SweepPoint(name, curve, setting, label, extra["file_bytes"] * 8 / numel,
                                     s.kl, s.dppl_pct, s.top1, extra["file_bytes"]))
        for bits in KIVI_SWEEP_BITS:
            decoded, bpe = kivi_roundtrip(kv, bits)
            s = quality(decoded)
            points.append(SweepPoint(name, "kivi", float(bits), f"int{bits}", bpe,
                                     s.kl, s.dppl_pct, s.top1, None))

    weighed: list[ImportanceRow] = []
    context_elements = 2 * kv.num_layers * kv.kv_heads * kv.head_dim * P
    for scorer in config.scorers:
        # the scores, applied to the reference prefill's cache (a scorer's own prefill may
        # differ from it by float rounding: its attention is computed another way)
        scored = scoring.score(km, ids[:P], scorer)
        scored = scoring.Scored(kv, scored.scores, scored.scorer, scored.seconds)
        for level in config.levels:
            pair = [(level, codec_for_level(level, profile))]
            keep_modes = ("keep", "keep+importance") if config.keep_weigh else ("keep",)
            runs = [("importance", None, None)] + [
                (mode, f, rule) for f in config.keeps for rule in config.keep_rules for mode in keep_modes]
            for mode, f, rule in runs:
                used = scoring.apply(scored, pair, profile, weigh=mode != "keep", keep=f,
                                     keep_rule=rule or "shared")
                out = tmp / f"{name}.{scorer}.{level}.kvz"
                api.write_kvz(used.kv, ids[:P], out, km, levels=used.pairs, chunk_tokens=chunk_span(config.chunk_tokens, f),
                              dtype="float32", importance=used.classes, extra_header=used.header)
                file_bytes = out.stat().st_size
                s = quality(api.load_kv(out).kv)
                out.unlink()
                weighed.append(ImportanceRow(
                    name, level, scorer, mode, f, rule, file_bytes * 8 / (2 * used.kv.layout.stored() * kv.head_dim),
                    file_bytes * 8 / context_elements, s.kl, s.dppl_pct, s.top1, file_bytes,
                    used.kv.layout.stored() / scored.kv.layout.stored()))
    return rows, points, sizes, weighed


# ------------------------------------------------------------------- speed
def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_high_water(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``pid`` to its current RSS (Linux ≥ 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class DecodeMemory:
    """Peak memory of this process while the block runs (decoding runs on its threads).

    The RSS high-water mark (``VmHWM``, reset on entry) above the RSS on entry.
    Where the mark cannot be reset (not Linux, or no permission), RSS is sampled
    every 2 ms instead (``method`` says which).
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.method = "hwm"

    @staticmethod
    def _pids() -> list[int]:
        return [os.getpid()]

    def __enter__(self) -> DecodeMemory:
        gc.collect()
        pids = self._pids()
        self.base = {pid: _status_kib(pid, "VmRSS:") for pid in pids}
        if not all(_reset_high_water(pid) for pid in pids) or not any(self.base.values()):
            self.method = "sampled"
            self._sampled = 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample_loop, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        now = sum(max(0, _status_kib(p, "VmRSS:") - self.base.get(p, 0)) for p in self._pids())
        self._sampled = max(self._sampled, now)

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def __exit__(self, *exc: Any) -> None:
        if self.method == "sampled":
            self._stop.set()
            self._thread.join()
            self._sample()
            self.peak_bytes = self._sampled * 1024
            return
        pids = set(self.base) | set(self._pids())
        kib = sum(max(0, _status_kib(p, "VmHWM:") - self.base.get(p, 0)) for p in pids)
        self.peak_bytes = kib * 1024


def long_ids(km: KVModel, texts: Sequence[Path], need: int) -> tuple[list[int], list[str]]:
    """``need`` token ids from the texts put end to end (as few as it takes), and their names."""
    parts: list[str] = []
    ids: list[int] = []
    for path in texts:
        parts.append(api.read_text(path))
        ids = km.document_ids("\n\n".join(parts), None)
        if len(ids) >= need:
            return ids[:need], [Path(p).name for p in texts[: len(parts)]]
    raise InputError(
        f"the texts together have {len(ids)} tokens; the speed section needs {need} "
        "(give longer texts or shorter --lengths)"
    )


def run_speed(km: KVModel, config: BenchConfig, profile: Profile | None, tmp: Path,
              progress: Progress | None = None) -> tuple[list[SpeedRow], list[str]]:
    """The speed section: one row per length in ``config.lengths``, and the texts it read.

    A length beyond the model's context is cut to ``context - 1`` tokens, so the
    first generated token still fits (the row's ``tokens`` says what was run).
    """
    cap = km.max_context - 1
    lengths = [min(int(n), cap) for n in config.lengths]
    ids_all, used = long_ids(km, config.texts, max(lengths) + 1)
    codec = codec_for_level(config.speed_level, profile)
    ticker = _Ticker(progress, "speed", len(lengths))
    rows = []
    for n in lengths:
        ids = ids_all[: n + 1]
        t0 = time.perf_counter()
        kv = km.prefill(ids[:n])
        km.teacher_force(kv, ids[n:])
        ttft_prefill = time.perf_counter() - t0
        out = tmp / f"speed-{n}.kvz"
        coded, classes = _as_encoded(codec, profile, config,
                                     lambda scorer, together, prefix=ids[:n]: _profile_classes(km, prefix, scorer, together))
        summary = api.write_kvz(kv, ids[:n], out, km, levels=[(config.speed_level, coded)],
                                chunk_tokens=chunk_span(config.chunk_tokens), dtype="float32", importance=classes)
        numel = kv.elements()
        del kv
        decoders = threads_for([codec], numel, summary.chunks, config.decoders)
        # Cold, as a fresh process finds it: empty entropy-model caches.
        clear_model_caches()
        with DecodeMemory() as mem:
            t0 = time.perf_counter()
            decoded = api.load_kv(out, decoders=config.decoders).kv
            decode_s = time.perf_counter() - t0
        # The decoded tensor is held at the end, whatever RSS shows: a small one can
        # fit in heap memory freed earlier, which no RSS mark sees grow.
        peak = max(mem.peak_bytes, decoded.elements() * decoded.layers[0].element_size())
        km.teacher_force(decoded, ids[n:])
        ttft_kvz = time.perf_counter() - t0
        del decoded
        gc.collect()
        t0 = time.perf_counter()
        again = api.load_kv(out, decoders=config.decoders).kv
        warm_s = time.perf_counter() - t0
        del again
        file_bytes = out.stat().st_size
        out.unlink()
        fp32 = numel * 4
        rows.append(SpeedRow(
            tokens=n, level=config.speed_level, codec=codec.codec_id,
            bits_per_element=file_bytes * 8 / numel, file_bytes=file_bytes,
            encode_meps=numel / summary.encode_seconds / 1e6,
            decode_meps=numel / decode_s / 1e6, decode_warm_meps=numel / warm_s / 1e6,
            decoders=decoders, peak_decode_bytes=peak, cache_fp32_bytes=fp32,
            peak_ratio=peak / fp32, peak_method=mem.method,
            ttft_kvz_s=ttft_kvz, ttft_prefill_s=ttft_prefill, ttft_speedup=ttft_prefill / ttft_kvz,
        ))
        ticker.tick()
    return rows, used


# ----------------------------------------------------------------- summaries
def _means(rows: Sequence[Any], key: Callable[[Any], Any], same: Sequence[str],
           rounded: Sequence[str] = ()) -> list[Any]:
    """One row per ``key``, in first-seen order: the fields in ``same`` as the group's first
    row has them, every other field the mean over the group's texts (None when a row lacks
    it; the ``rounded`` ones to whole numbers)."""
    groups: dict[Any, list[Any]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    means = []
    for group in groups.values():
        values: dict[str, Any] = {"text": f"mean of {len(group)}"}
        for f in fields(group[0]):
            if f.name == "text":
                continue
            if f.name in same:
                values[f.name] = getattr(group[0], f.name)
                continue
            xs = [getattr(r, f.name) for r in group]
            mean = None if any(x is None for x in xs) else statistics.fmean(xs)
            values[f.name] = round(mean) if mean is not None and f.name in rounded else mean
        means.append(type(group[0])(**values))
    return means


def summarize(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """One row per method: the mean of each metric over the texts."""
    return _means(rows, lambda r: r.method, ("method",))


def summarize_sweep(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """One point per (curve, setting): the mean over the texts."""
    return _means(points, lambda p: (p.curve, p.setting), ("curve", "setting", "label"), ("file_bytes",))


def summarize_importance(rows: Sequence[ImportanceRow]) -> list[ImportanceRow]:
    """One row per (level, scorer, mode, keep, rule): the mean over the texts."""
    return _means(rows, lambda r: r.method, ("level", "scorer", "mode", "keep", "rule"), ("file_bytes",))


def rows_to_json(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot(rows: Sequence[BenchRow], out: str | Path, title: str,
         sweep: Sequence[SweepPoint] = ()) -> None:
    """Rate–quality chart: bits per element against KL (log scale).

    One point per method of ``rows``; each curve of ``sweep`` (means) as a line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6  # exact methods (KL 0) are drawn on this line
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curves: dict[str, list[SweepPoint]] = {}
    for p in sweep:
        curves.setdefault(p.curve, []).append(p)
    for curve, pts in curves.items():
        pts = sorted(pts, key=lambda p: p.bits_per_element)
        ax.plot([p.bits_per_element for p in pts], [max(p.kl, floor) for p in pts],
                marker=".", linewidth=1.2, label=curve)
    for r in rows:
        kl = max(r.kl, floor)
        level = r.method in LEVELS or r.method.removesuffix(UNCAL_SUFFIX) in LEVELS
        marker = "o" if level else ("s" if r.method in DEFAULT_CODECS else "^")
        ax.scatter(r.bits_per_element, kl, marker=marker, s=50, color="black" if curves else None,
                   zorder=3)
        ax.annotate(r.method, (r.bits_per_element, kl), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if curves:
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per KV element (whole file)")
    ax.set_ylabel(f"KL(original ‖ decoded), nats/token (0 drawn at {floor:g})")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
