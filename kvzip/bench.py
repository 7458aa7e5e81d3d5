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
"""

from __future__ import annotations

import math
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from kvzip import api
from kvzip.codecs import LEVELS, Codec, codec_from_config
from kvzip.errors import InputError
from kvzip.model import KVModel

Progress = Callable[[str, int, int], None]


def default_texts() -> list[Path]:
    """Real texts already on the machine that no one on the project wrote."""
    import argparse
    import typing

    candidates = [
        Path("/usr/share/common-licenses/GPL-3"),
        Path("/usr/share/common-licenses/GFDL-1.3"),
        Path("/usr/share/common-licenses/MPL-2.0"),
        Path(argparse.__file__),
        Path(typing.__file__),
    ]
    return [p for p in candidates if p.is_file()]


# Baselines that are not stored codecs: (name, bits, what they are).
KIVI_BASELINES = {"kivi-int4": 4, "kivi-int2": 2}
DEFAULT_CODECS = ("cachegen",)


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


def kivi_roundtrip(kv: torch.Tensor, bits: int, group: int = 32) -> tuple[torch.Tensor, float]:
    """KIVI-style asymmetric quantization, and the bits per element it would take.

    Keys are quantized per channel (groups of ``group`` tokens), values per token
    (groups of ``group`` channels); each group stores an fp16 scale and zero point.
    KIVI's full-precision window of recent tokens is not modelled.
    """
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
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half().float()
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
    chunk_tokens: int = api.DEFAULT_CHUNK_TOKENS
    baselines: bool = True


def resolve_codecs(names: Sequence[str]) -> list[tuple[str, Codec]]:
    """Codec ids (default config) or level names -> (row name, codec)."""
    out = []
    for name in names:
        if name in LEVELS:
            out.append((name, codec_from_config(LEVELS[name])))
        else:
            out.append((name, codec_from_config({"id": name})))
    return out


def run_bench(km: KVModel, config: BenchConfig, progress: Progress | None = None) -> list[BenchRow]:
    """Run the protocol on every text; one row per (text, method)."""
    for level in config.levels:
        if level not in LEVELS:
            raise InputError(f"unknown level {level!r} (choose from: {', '.join(LEVELS)})")
    methods = resolve_codecs(config.codecs) + resolve_codecs(config.levels)
    need = config.prefix + config.cont + 1
    rows: list[BenchRow] = []
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
    steps = len(usable) * (len(methods) + (4 if config.baselines else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("bench", done, steps)

    with tempfile.TemporaryDirectory(prefix="kvzip-bench-") as tmp:
        for path, ids in usable:
            rows.extend(_bench_text(km, config, path, ids, methods, Path(tmp), tick))
    return rows


def _bench_text(
    km: KVModel,
    config: BenchConfig,
    path: Path,
    ids: list[int],
    methods: list[tuple[str, Codec]],
    tmp: Path,
    tick: Callable[[], None],
) -> list[BenchRow]:
    P = config.prefix
    started = time.perf_counter()
    kv = km.prefill(ids[:P])
    ref_first = km.teacher_force(kv, ids[P : P + 1])
    ttft_prefill = time.perf_counter() - started
    del ref_first
    follow = ids[P : P + config.cont]
    targets = torch.tensor(ids[P + 1 : P + config.cont + 1])
    ref_logits = km.teacher_force(kv, follow)
    numel = kv.numel()
    name = path.name
    rows = []

    def row(method: str, decoded: torch.Tensor, bits: float, **extra: Any) -> BenchRow:
        s = score(ref_logits, km.teacher_force(decoded, follow), targets)
        tick()
        return BenchRow(
            text=name, method=method, bits_per_element=bits, kl=s.kl, dppl_pct=s.dppl_pct,
            top1=s.top1, ttft_prefill_s=ttft_prefill,
            **{"encode_meps": None, "decode_meps": None, "ttft_kvz_s": None, "file_bytes": None,
               **extra},
        )

    def stored(method: str, codec: Codec, dtype: str) -> BenchRow:
        out = tmp / f"{name}.{method}.kvz"
        summary = api.write_kvz(
            kv, ids[:P], out, km, levels=[(method, codec)], chunk_tokens=config.chunk_tokens,
            dtype=dtype,
        )
        t0 = time.perf_counter()
        decoded = api.load_kv(out).kv
        decode_s = time.perf_counter() - t0
        km.teacher_force(decoded, ids[P : P + 1])
        ttft = time.perf_counter() - t0
        file_bytes = out.stat().st_size
        out.unlink()
        return row(
            method, decoded, file_bytes * 8 / numel,
            encode_meps=numel / summary.encode_seconds / 1e6,
            decode_meps=numel / decode_s / 1e6, ttft_kvz_s=ttft, file_bytes=file_bytes,
        )

    if config.baselines:
        rows.append(row("fp16", kv.half().float(), 16.0))
        rows.append(stored("zstd-fp16", codec_from_config(LEVELS["lossless"]), "float16"))
        for method, bits in KIVI_BASELINES.items():
            decoded, bpe = kivi_roundtrip(kv, bits)
            rows.append(row(method, decoded, bpe))
    for method, codec in methods:
        rows.append(stored(method, codec, "float32"))
    return rows


def summarize(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """One row per method: the mean of each metric over the texts."""
    by_method: dict[str, list[BenchRow]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    means = []
    for method, group in by_method.items():
        values: dict[str, Any] = {"text": f"mean of {len(group)}", "method": method}
        for f in fields(BenchRow):
            if f.name in values:
                continue
            xs = [getattr(r, f.name) for r in group]
            values[f.name] = None if any(x is None for x in xs) else statistics.fmean(xs)
        means.append(BenchRow(**values))
    return means


def rows_to_json(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot(rows: Sequence[BenchRow], out: str | Path, title: str) -> None:
    """Rate–quality chart: bits per element against KL (log scale), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6  # exact methods (KL 0) are drawn on this line
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        kl = max(r.kl, floor)
        marker = "o" if r.method in LEVELS else ("s" if r.method in DEFAULT_CODECS else "^")
        ax.scatter(r.bits_per_element, kl, marker=marker, s=50)
        ax.annotate(r.method, (r.bits_per_element, kl), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per KV element (whole file)")
    ax.set_ylabel(f"KL(original ‖ decoded), nats/token (0 drawn at {floor:g})")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
