"""Which decorrelating basis pays: none, PCA per (layer, kv head), or PCA per layer across heads.

High-rate coding theory: at a fixed mean squared error, a Gaussian source coded in
a basis needs ``0.5 * log2(var_i)`` bits per component up to a constant, so a
basis's rate relative to the raw channels is the mean over components of
``0.5 * log2(eigenvalue / channel variance)`` (its coding gain).  This script
measures that gain (plain MSE, no error weighting) on pre-RoPE keys and values of
real calibration texts, and on held-out texts with the basis fitted on the
calibration texts.

    PYTHONPATH=. python benchmarks/basis_gain.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from kvzip.levels.calibrate import _pre_rope, default_calibration_texts, read_texts  # noqa: E402
from kvzip.model import KVModel  # noqa: E402

HELD_OUT = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3"]


def caches(km, texts, n=1024):
    out = []
    for _, content in texts:
        ids = km.encode_text(content, special_tokens=True)[:n]
        kv = km.prefill(ids).map(lambda t: t.float().numpy())  # every layer holds every position
        out.append(np.stack(_pre_rope(km, kv), axis=1)[:, :, :, 4:])
    return np.concatenate(out, axis=3)  # [2, L, H, T, D]


def rate(x_fit, x_eval, groups):
    """Mean bits/component saved by PCA fitted on x_fit, evaluated on x_eval ([N, dims])."""
    mu = x_fit.mean(0)
    saved = []
    for g in groups:
        a, b = x_fit[:, g] - mu[g], x_eval[:, g] - mu[g]
        _, vec = np.linalg.eigh(a.T @ a / len(a))
        var_basis = np.maximum((b @ vec).var(0), 1e-12)
        var_raw = np.maximum(b.var(0), 1e-12)
        saved.append(0.5 * (np.log2(var_raw) - np.log2(var_basis)))
    return float(np.mean(np.concatenate(saved)))


def main():
    km = KVModel.load(None)
    cal = caches(km, read_texts(default_calibration_texts()))
    held = caches(km, read_texts(HELD_OUT))
    _, L, H, _, D = cal.shape
    print("bits per element saved against coding raw channels (high-rate estimate); fit: calibration texts")
    print(f"{'':6s} {'per head, cal':>14s} {'per head, held-out':>19s} {'per layer, cal':>15s} {'per layer, held-out':>20s}")
    for k, name in enumerate(("keys", "values")):
        r = []
        for fit_eval in ((cal, cal), (cal, held)):
            ph = pl = 0.0
            for lay in range(L):
                f = fit_eval[0][k, lay].transpose(1, 0, 2).reshape(-1, H * D)
                e = fit_eval[1][k, lay].transpose(1, 0, 2).reshape(-1, H * D)
                ph += rate(f, e, [np.arange(h * D, (h + 1) * D) for h in range(H)])
                pl += rate(f, e, [np.arange(H * D)])
            r.append((ph / L, pl / L))
        print(f"{name:6s} {r[0][0]:14.3f} {r[1][0]:19.3f} {r[0][1]:15.3f} {r[1][1]:20.3f}")


if __name__ == "__main__":
    main()
