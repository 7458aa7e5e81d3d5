"""``kvzip calibrate``: measure a model's KV statistics and build a codec profile.

Steps, for calibration texts that should never be the texts a benchmark scores:

1. prefill each text, capturing the cache and each layer's query energy per
   RoPE channel pair (:mod:`kvzip.model.calibration`);
2. per (layer, kv head): the mean and covariance of pre-RoPE keys and of values
   (attention-sink tokens excluded: they are coded apart, at a finer step);
3. an error weighting: keys by query channel-pair energy (a key error only
   matters along the directions queries take), values by the output
   projection's Gram matrix (a value error reaches the residual stream through
   ``o_proj``); ``"mse"`` weighs every channel alike;
4. the PCA of the weighted data, so most energy sits in few components;
5. a step per (K/V, layer) from measured sensitivity: quantise one group at a
   probe step, teacher-force a continuation, read the KL it causes, per element
   quantised.  With ``KL_g ~ a_g n_g step_g^2`` and ``bits_g ~ -n_g log2 step_g``
   for a group of ``n_g`` elements, the allocation that minimises bits at a given
   total KL is ``step_g ~ a_g^-1/2``, whatever the groups' sizes (they differ in a
   model with sliding-window layers).
6. a quality check: the calibrated default level (``balanced``) codes each text's cache
   and the continuation is teacher-forced.  When its mean KL is above
   ``importance_above`` (nats per token), the same is done with the entries coded by
   the attention they received during the prefill (three importance classes,
   :mod:`kvzip.codecs.classes`); if that is better, the profile says so
   (``importance: "prefill"``) and encoding with it scores every entry that way.  The
   file stays about the same size; what it costs is the prefill's recorded attention.
   A model whose uniform levels are already within the bound (SmolLM2-135M: 0.0046 on
   these texts) keeps uniform precision and its encode speed.

The result is a :mod:`kvzip.codecs.profile` file bound to the model fingerprint.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvzip import __version__
from kvzip.codecs import ChunkContext, Codec
from kvzip.codecs.classes import DEFAULT_FACTORS, classes
from kvzip.codecs.profile import Profile, profile_from_bytes, profile_to_bytes
from kvzip.codecs.transforms import UnRoPE
from kvzip.errors import InputError
from kvzip.formats import LayeredKV
from kvzip.levels.progress import Progress
from kvzip.levels.table import DEFAULT_LEVEL, codec_for_level
from kvzip.model import KVModel
from kvzip.model.attention import prefill_attention
from kvzip.model.calibration import capture, output_gram

_UNROPE = UnRoPE()

# kvzip.importance's scorer for the attention an entry received during the prefill: the
# one a profile can turn on (step 6), since it needs no extra pass
PREFILL_SCORER = "prefill"

# Texts kvzip bench scores by default; calibration must not read them.
BENCH_TEXT_NAMES = ("GPL-3", "GPL-2", "GFDL-1.3", "argparse.py", "typing.py")


def default_calibration_texts() -> list[Path]:
    """Real texts on any machine kvzip runs on, none of them a default bench text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [stdlib / "pathlib.py", stdlib / "collections" / "__init__.py", stdlib / "functools.py"]
    lic = Path("/usr/share/common-licenses")
    names += [lic / "MPL-2.0", lic / "LGPL-2.1", lic / "Artistic"]
    return [p for p in names if p.is_file()]


@dataclass
class CalibrationOptions:
    key_weighting: str = "query"  # "query" | "mse"
    value_weighting: str = "output"  # "output" | "mse"
    basis: str = "pca-layer"  # "pca-layer" (across a layer's heads) | "pca" (per kv head) | "none"
    allocation: str = "sensitivity"  # "sensitivity" | "flat"
    tokens_per_text: int = 1024
    continuation: int = 128  # tokens teacher-forced when measuring sensitivity
    sensitivity_texts: int = 2
    probe_step: float = 0.5  # probe step, relative to the group's RMS in the new basis
    sink_tokens: int = 4
    # KL (nats per token, the calibrated default level on the calibration texts) above
    # which the profile has its levels spend bits by the prefill's attention (step 6)
    importance_above: float = 0.006

    def check(self) -> None:
        if self.key_weighting not in ("query", "mse") or self.value_weighting not in ("output", "mse"):
            raise InputError("weighting must be query|mse for keys and output|mse for values")
        if self.basis not in ("pca", "pca-layer", "none") or self.allocation not in ("sensitivity", "flat"):
            raise InputError("basis must be pca|pca-layer|none and allocation sensitivity|flat")
        if not self.importance_above >= 0:
            raise InputError(f"--importance-above must be a KL of 0 or more, got {self.importance_above}")
        if self.tokens_per_text < self.continuation + 64:
            raise InputError(f"tokens per text must be at least {self.continuation + 64}")


@dataclass
class _Text:
    name: str
    prefix: list[int]
    cont: list[int]


def _psd_sqrt(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G^1/2, G^-1/2) of a symmetric PSD matrix, eigenvalues floored at 1e-6 of the largest."""
    w, u = np.linalg.eigh(g)
    w = np.maximum(w, w.max() * 1e-6)
    return (u * np.sqrt(w)) @ u.T, (u / np.sqrt(w)) @ u.T


def _layer_context(km: KVModel, kv: LayeredKV, layer: int) -> ChunkContext:
    """Layer ``layer`` of ``kv`` ([2, H, n, D]) as one block at the positions it holds."""
    tables, index = km.rope_tables()
    inv_freq = None if tables is None else tables[index[layer]]
    positions = kv.layout.positions[layer][0]
    return ChunkContext(int(positions[0]) if positions.size else 0, int(positions.size), 1, kv.kv_heads,
                        kv.head_dim, "float32", inv_freq, layer_ids=(layer,), positions=positions)


def _pre_rope(km: KVModel, kv: LayeredKV) -> list[np.ndarray]:
    """Each layer's [2, H, n, D] with keys un-rotated as the codec does (copies)."""
    return [_UNROPE.forward(layer[:, None], _layer_context(km, kv, i))[:, 0] for i, layer in enumerate(kv.layers)]


def _basis(a: np.ndarray, a_inv: np.ndarray, cov: np.ndarray, pca: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(forward, inverse) of the basis that weights by ``a`` and then, with ``pca``,
    decorrelates: the weighted covariance's eigenvectors, largest variance first."""
    if pca:
        c = a @ cov @ a.T
        ev, p = np.linalg.eigh((c + c.T) / 2)
        p = p[:, np.argsort(ev)[::-1]]
    else:
        p = np.eye(a.shape[0])
    return p.T @ a, a_inv @ p


def _re_rope(km: KVModel, kv: LayeredKV, layer: int, x: np.ndarray) -> np.ndarray:
    """Keys of one layer's pre-RoPE ``x`` ([2, H, n, D]) rotated back (a copy)."""
    return _UNROPE.inverse(x[:, None].copy(), _layer_context(km, kv, layer))[:, 0]


def _kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(test_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def calibrate(
    km: KVModel,
    texts: Sequence[tuple[str, str]],
    options: CalibrationOptions | None = None,
    progress: Progress | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Profile bytes for ``km`` from ``texts`` ((name, content) pairs), and a report."""
    opt = options or CalibrationOptions()
    opt.check()
    prog = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    items: list[_Text] = []
    per_text = min(opt.tokens_per_text, km.max_context)
    for name, content in texts:
        ids = km.encode_text(content, special_tokens=True)[:per_text]
        if len(ids) < opt.continuation + 64:
            continue
        items.append(_Text(name, ids[: -opt.continuation], ids[-opt.continuation :]))
    if not items:
        raise InputError(
            f"no calibration text has {opt.continuation + 64} tokens or more; give longer texts"
        )
    L, H, D = km.num_layers, km.kv_heads, km.head_dim
    ns = opt.sink_tokens

    # 1-2. statistics, over each layer's [H * D] channel vector, from the positions each
    # layer's cache really holds (a sliding layer: its window), sinks excluded
    HD = H * D
    n = np.zeros(L)
    s1 = np.zeros((2, L, HD))
    s2 = np.zeros((2, L, HD, HD))
    qe = np.zeros((L, H, D // 2))
    caches: list[LayeredKV] = []
    total = sum(len(t.prefix) for t in items)
    done = 0
    for t in items:
        st = capture(km, t.prefix)
        caches.append(st.kv)
        for lay, x in enumerate(_pre_rope(km, st.kv)):
            keep = st.kv.layout.positions[lay][0] >= ns
            body = x[:, :, keep, :].transpose(0, 2, 1, 3).reshape(2, -1, HD).astype(np.float64)
            n[lay] += body.shape[1]
            s1[:, lay] += body.sum(axis=1)
            s2[:, lay] += np.einsum("ktc,kte->kce", body, body)
        qe += st.query_pair_energy
        done += len(t.prefix)
        prog("calibrate: statistics", done, total)
    if (n == 0).any():
        raise InputError("a layer holds no calibration tokens past the attention sinks; give longer texts")
    mean = s1 / n[None, :, None]
    cov = s2 / n[None, :, None, None] - mean[..., :, None] * mean[..., None, :]

    # 3-4. weighting (block-diagonal per head) and basis (per head, or across the layer)
    G = 1 if opt.basis == "pca-layer" else H
    W = HD // G
    fwd = np.zeros((2, L, G, W, W))
    inv = np.zeros((2, L, G, W, W))
    gram = output_gram(km) if opt.value_weighting == "output" else None
    for lay in range(L):
        wk, wk_inv = np.eye(HD), np.eye(HD)
        wv, wv_inv = np.eye(HD), np.eye(HD)
        for h in range(H):
            blk = slice(h * D, (h + 1) * D)
            grp = slice(h, h + 1) if G == H else slice(0, H)  # weights are relative within a basis group
            if opt.key_weighting == "query":
                e = qe[lay, h] / max(qe[lay, grp].mean(), 1e-30)
                w = np.sqrt(np.maximum(np.concatenate([e, e]), 1e-4))
                wk[blk, blk], wk_inv[blk, blk] = np.diag(w), np.diag(1 / w)
            if gram is not None:
                g = gram[lay, h] / max(np.trace(gram[lay, grp].sum(0)) / (D * len(range(H)[grp])), 1e-30)
                wv[blk, blk], wv_inv[blk, blk] = _psd_sqrt(g)
        for kv, (a, a_inv) in enumerate(((wk, wk_inv), (wv, wv_inv))):
            for grp in range(G):
                blk = slice(grp * W, (grp + 1) * W)
                fwd[kv, lay, grp], inv[kv, lay, grp] = _basis(a[blk, blk], a_inv[blk, blk], cov[kv, lay, blk, blk],
                                                              opt.basis != "none")
    # RMS of each (K/V, layer) in the new basis
    cov_g = np.stack([cov[..., g * W : (g + 1) * W, g * W : (g + 1) * W] for g in range(G)], axis=2)
    var_new = np.einsum("klgij,klgjm,klgim->kl", fwd, cov_g, fwd) / HD
    rms = np.sqrt(np.maximum(var_new, 1e-30))

    # 5. allocation
    sens = None
    if opt.allocation == "sensitivity":
        sens = _sensitivity(km, items[: opt.sensitivity_texts], caches, mean, fwd, inv, rms, opt, prog)
        a = np.maximum(sens, 1e-12)
        raw = a ** -0.5
        scale = raw / np.exp(np.mean(np.log(raw / rms)))
    else:
        scale = rms.copy()
    tensors = {
        "key_mean": mean[0].reshape(L, H, D), "value_mean": mean[1].reshape(L, H, D),
        "key_fwd": fwd[0], "key_inv": inv[0], "value_fwd": fwd[1], "value_inv": inv[1],
        "step_scale": scale,
    }
    ident = km.identity()
    meta: dict[str, Any] = {
        "model_fingerprint": ident["fingerprint"],
        "model_name": ident["name"],
        "geometry": [L, H, D],
        "options": asdict(opt),
        "texts": [{"name": t.name, "tokens": len(t.prefix) + len(t.cont)} for t in items],
        "calibration_tokens": total,
        "kvzip_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    # 6. quality check of the default level, as the profile stands
    check = _quality(km, items, caches, profile_from_bytes(profile_to_bytes(tensors, meta)), opt, prog)
    meta["importance"] = check["importance"]
    meta["quality"] = check
    data = profile_to_bytes(tensors, meta)
    report = {
        "seconds": round(time.perf_counter() - t0, 2),
        "rms": rms.tolist(),
        "step_scale": scale.tolist(),
        "sensitivity": None if sens is None else sens.tolist(),
        **meta,
    }
    return data, report


def _sensitivity(km, items, caches, mean, fwd, inv, rms, opt, prog) -> np.ndarray:
    """KL per unit squared step and per element quantised, for each (K/V, layer),
    quantising that group alone.  Per element: with every layer holding every position
    that is a constant factor, which the allocation's normalisation removes; in a model
    with sliding-window layers, it keeps the full layers (more positions, so more KL
    when all of them are quantised) from being given steps that are too fine."""
    L = km.num_layers
    ns = opt.sink_tokens
    kl = np.zeros((2, L))
    total = 2 * L * len(items)
    done = 0
    G, W = fwd.shape[2], fwd.shape[3]
    for t, kv in zip(items, caches):
        as_torch = kv.map(torch.from_numpy)
        ref = km.teacher_force(as_torch, t.cont)
        pre = _pre_rope(km, kv)
        for k in range(2):
            for lay in range(L):
                x = pre[lay]
                _, H, T, D = x.shape
                body = kv.layout.positions[lay][0] >= ns
                m = mean[k, lay].reshape(G, 1, W)
                xg = x[k].transpose(1, 0, 2).reshape(T, G, W).transpose(1, 0, 2)
                y = np.matmul(xg - m, fwd[k, lay].swapaxes(-1, -2))
                step = opt.probe_step * rms[k, lay]
                yq = y.copy()
                yq[:, body] = np.rint(y[:, body] / step) * step
                xq = x.copy()
                back = np.matmul(yq, inv[k, lay].swapaxes(-1, -2)) + m
                xq[k] = back.transpose(1, 0, 2).reshape(T, H, D).transpose(1, 0, 2)
                layers = list(as_torch.layers)
                layers[lay] = torch.from_numpy(_re_rope(km, kv, lay, xq.astype(np.float32)))
                test = km.teacher_force(LayeredKV(layers, kv.layout), t.cont)
                # per element quantised: a sliding layer holds fewer positions than a full
                # one, and the best steps go as (KL per element per step^2)^-1/2
                kl[k, lay] += _kl(ref, test) / (step**2) / max(1, int(body.sum()) * H * D)
                done += 1
                prog("calibrate: sensitivity", done, total)
    return kl / len(items)


def _roundtrip(km: KVModel, kv: LayeredKV, codec: Codec,
               per_entry: list[np.ndarray] | None = None) -> tuple[LayeredKV, int]:
    """``kv`` coded and decoded by ``codec`` a layer at a time (with ``per_entry``, each
    layer's ``[heads, n]`` importance classes), and the payloads' bytes."""
    layers, nbytes = [], 0
    for i, x in enumerate(kv.layers):
        ctx = _layer_context(km, kv, i)
        if per_entry is not None:
            ctx = dataclasses.replace(ctx, importance=np.ascontiguousarray(per_entry[i][None], np.uint8))
        payload = codec.encode(np.ascontiguousarray(x[:, None]), ctx)
        nbytes += len(payload)
        layers.append(torch.from_numpy(codec.decode(payload, ctx)[:, 0]))
    return LayeredKV(layers, kv.layout), nbytes


def _quality(km: KVModel, items: list[_Text], caches: list[LayeredKV], profile: Profile,
             opt: CalibrationOptions, prog: Progress) -> dict[str, Any]:
    """Step 6: the calibrated default level's KL and bits per stored element on each
    calibration text, uniform and (when the uniform mean is above the bound) coded by
    the prefill's attention; which one the profile's levels use."""
    refs = [km.teacher_force(kv.map(torch.from_numpy), t.cont) for t, kv in zip(items, caches)]

    def measure(codec: Codec, stage: str, by_prefill: bool) -> dict[str, Any]:
        kl, bits = [], []
        for i, (t, kv, ref) in enumerate(zip(items, caches, refs)):
            per_entry = (classes(prefill_attention(km, t.prefix)[1], heads_together=not codec.codes_heads_apart())
                         if by_prefill else None)
            decoded, nbytes = _roundtrip(km, kv, codec, per_entry)
            kl.append(_kl(ref, km.teacher_force(decoded, t.cont)))
            bits.append(nbytes * 8 / kv.elements())
            prog(stage, i + 1, len(items))
        return {"kl": [float(f"{x:.4g}") for x in kl], "bits": [round(b, 4) for b in bits],
                "mean_kl": float(np.mean(kl)), "mean_bits": float(np.mean(bits))}

    out: dict[str, Any] = {"level": DEFAULT_LEVEL, "bound": opt.importance_above, "texts": [t.name for t in items],
                           "importance": None}
    out["uniform"] = measure(codec_for_level(DEFAULT_LEVEL, profile), "calibrate: quality check", False)
    if out["uniform"]["mean_kl"] <= opt.importance_above:
        return out
    weighted = codec_for_level(DEFAULT_LEVEL, profile, importance_factors=DEFAULT_FACTORS)
    out[PREFILL_SCORER] = measure(weighted, "calibrate: quality check, by importance", True)
    if out[PREFILL_SCORER]["mean_kl"] < out["uniform"]["mean_kl"]:
        out["importance"] = PREFILL_SCORER
    return out


def read_texts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        path = Path(p)
        try:
            out.append((path.name, path.read_text(errors="replace")))
        except OSError as exc:
            raise InputError(f"cannot read calibration text {path}: {exc.strerror or exc}") from None
    return out
