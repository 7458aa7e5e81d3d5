"""Calibration profiles: a model's measured KV transforms and bit allocation, shared by files.

A profile is to kvzip's codec what a dictionary is to zstd: computed once per
model by ``kvzip calibrate`` from calibration texts, stored once, and named by
every ``.kvz`` that was coded with it.  It holds, for each layer and kv head,

* the mean of the pre-RoPE keys and of the values,
* a linear map into a decorrelated, error-weighted basis (``key_fwd`` /
  ``value_fwd``) and its inverse (``key_inv`` / ``value_inv``), one per kv head
  ([L, H, D, D]) or one per layer across its heads ([L, 1, H*D, H*D]),
* the quantiser step multiplier of each (K/V, layer) chosen from measured
  sensitivity (``step_scale``),

as a safetensors file (plain tensors plus string metadata; nothing executable).
A profile is identified by the SHA-256 of its file bytes: a ``.kvz`` stores that
digest in its codec config, and decoding refuses a profile whose bytes hash to
anything else.

This module is the profile as a value (parse, validate, serialise); where
profiles are stored and found is :mod:`kvzip.levels.profiles`, which hands the
codec the profile its config names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kvzip.errors import ProfileError, ProfileMismatchError

PROFILE_SUFFIX = ".kvzprofile"
PROFILE_FORMAT = "kvzip-profile/1"
MAX_PROFILE_BYTES = 1 << 30
_TENSORS = ("key_mean", "value_mean", "key_fwd", "key_inv", "value_fwd", "value_inv", "step_scale")


@dataclass
class Profile:
    """A loaded, validated profile."""

    digest: str  # sha256 of the file bytes, hex
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None
    size: int = 0

    @property
    def model_fingerprint(self) -> str:
        return str(self.meta["model_fingerprint"])

    @property
    def geometry(self) -> tuple[int, int, int]:
        layers, heads, dim = self.tensors["key_mean"].shape
        return int(layers), int(heads), int(dim)

    @property
    def importance(self) -> str | None:
        """The importance scorer this profile's lossy levels spend their bits by (``kvzip
        calibrate`` turns one on when uniform precision misses the quality bound), or None."""
        name = self.meta.get("importance")
        return name if isinstance(name, str) and name else None

    def check_geometry(self, layers: int, heads: int, dim: int) -> None:
        if self.geometry != (layers, heads, dim):
            raise ProfileMismatchError(
                f"profile {self.digest[:12]} is for {self.geometry[0]} layers x {self.geometry[1]} kv heads "
                f"x head_dim {self.geometry[2]}, not {layers} x {heads} x {dim}"
            )

    def check_model(self, fingerprint: str) -> None:
        if self.model_fingerprint != fingerprint:
            raise ProfileMismatchError(
                f"profile {self.digest[:12]} was calibrated for model {self.model_fingerprint[:16]}…, "
                f"not {fingerprint[:16]}…"
            )

    def summary(self) -> dict[str, Any]:
        return {"digest": self.digest, "bytes": self.size, "path": str(self.path) if self.path else None,
                **{k: v for k, v in self.meta.items() if k != "format"}}


def _validate(tensors: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> None:
    if meta.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: not a kvzip profile (format {meta.get('format')!r})")
    if not isinstance(meta.get("model_fingerprint"), str):
        raise ProfileError(f"{where}: profile metadata has no model fingerprint")
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise ProfileError(f"{where}: profile lacks tensors {', '.join(missing)}")
    km = tensors["key_mean"]
    if km.ndim != 3 or min(km.shape) < 1:
        raise ProfileError(f"{where}: key_mean has shape {km.shape}")
    layers, heads, dim = km.shape
    # Bases act on each layer's [heads * dim] channel vector split into G equal groups:
    # G = heads (one basis per kv head) or G = 1 (one basis across the layer's heads).
    groups = tensors["key_fwd"].shape[1] if tensors["key_fwd"].ndim == 4 else 0
    if groups not in (heads, 1):
        raise ProfileError(f"{where}: key_fwd has shape {tensors['key_fwd'].shape}; expected one basis "
                           f"per kv head or one per layer")
    width = heads * dim // groups
    basis = (layers, groups, width, width)
    want = {
        "value_mean": (layers, heads, dim),
        "key_fwd": basis, "key_inv": basis, "value_fwd": basis, "value_inv": basis,
        "step_scale": (2, layers),
    }
    for name, shape in want.items():
        t = tensors[name]
        if t.shape != shape:
            raise ProfileError(f"{where}: {name} has shape {t.shape}, expected {shape}")
    for name in _TENSORS:
        t = tensors[name]
        if t.dtype != np.float32 or not np.isfinite(t).all():
            raise ProfileError(f"{where}: {name} must be finite float32")
    if (tensors["step_scale"] <= 0).any():
        raise ProfileError(f"{where}: step_scale must be positive")


def read_profile_meta(data: bytes, where: str = "profile") -> dict[str, Any]:
    """The kvzip metadata of a profile from its first bytes (the safetensors length and
    JSON header; the tensors need not follow): what finding a model's profiles reads."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 + n:
            raise ValueError("the safetensors header is truncated")
        header = json.loads(data[8 : 8 + n])
        meta_raw = header.get("__metadata__") or {}
        meta = json.loads(meta_raw.get("kvzip", "{}"))
    except (ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise ProfileError(f"{where}: not a readable profile ({exc})") from None
    if not isinstance(meta, dict):
        raise ProfileError(f"{where}: profile metadata is not an object")
    return meta


def profile_from_bytes(data: bytes, where: str = "profile", path: Path | None = None) -> Profile:
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{where}: {len(data)} bytes is larger than any kvzip profile")
    meta = read_profile_meta(data, where)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ProfileError(f"{where}: not a readable profile ({exc})") from None
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _validate(tensors, meta, where)
    return Profile(hashlib.sha256(data).hexdigest(), meta, tensors, path, len(data))


def profile_to_bytes(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    meta = {"format": PROFILE_FORMAT, **meta}
    tensors = {k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in _TENSORS}
    _validate(tensors, meta, "new profile")
    return st_save(tensors, metadata={"kvzip": json.dumps(meta, sort_keys=True)})
