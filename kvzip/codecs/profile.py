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

Where profiles are found, first match wins:

1. files registered in this process (``register_profile_file``; ``--profile``),
   which are also put in ``KVZIP_PROFILE_PATH`` so decode workers see them;
2. ``<dir>/<digest>.kvzprofile`` for each directory in ``KVZIP_PROFILE_DIR``
   (``os.pathsep``-separated), else the user cache directory
   (``platformdirs.user_cache_dir("kvzip")/profiles``; ``~/.cache/kvzip/profiles`` on Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kvzip.atomic import atomic_output
from kvzip.errors import ProfileError, ProfileMismatchError, ProfileNotFoundError

PROFILE_SUFFIX = ".kvzprofile"
PROFILE_FORMAT = "kvzip-profile/1"
MAX_PROFILE_BYTES = 1 << 30
_ENV_DIR = "KVZIP_PROFILE_DIR"
_ENV_PATH = "KVZIP_PROFILE_PATH"
_TENSORS = ("key_mean", "value_mean", "key_fwd", "key_inv", "value_fwd", "value_inv", "step_scale")


def default_profile_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvzip")) / "profiles"


def profile_dirs() -> list[Path]:
    env = os.environ.get(_ENV_DIR)
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [default_profile_dir()]


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


def profile_from_bytes(data: bytes, where: str = "profile", path: Path | None = None) -> Profile:
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{where}: {len(data)} bytes is larger than any kvzip profile")
    try:
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta_raw = header.get("__metadata__") or {}
        meta = json.loads(meta_raw.get("kvzip", "{}"))
    except (SafetensorError, ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise ProfileError(f"{where}: not a readable profile ({exc})") from None
    if not isinstance(meta, dict):
        raise ProfileError(f"{where}: profile metadata is not an object")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _validate(tensors, meta, where)
    return Profile(hashlib.sha256(data).hexdigest(), meta, tensors, path, len(data))


def profile_to_bytes(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    meta = {"format": PROFILE_FORMAT, **meta}
    tensors = {k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in _TENSORS}
    _validate(tensors, meta, "new profile")
    return st_save(tensors, metadata={"kvzip": json.dumps(meta, sort_keys=True)})


def write_profile(data: bytes, directory: str | os.PathLike[str] | None = None,
                  path: str | os.PathLike[str] | None = None) -> Profile:
    """Store profile bytes atomically at ``path``, or as ``<directory>/<digest>.kvzprofile``."""
    prof = profile_from_bytes(data)
    if path is None:
        d = Path(directory) if directory is not None else profile_dirs()[0]
        target = d / f"{prof.digest}{PROFILE_SUFFIX}"
    else:
        target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        tmp.write_bytes(data)
    prof.path = target
    _CACHE[prof.digest] = prof
    return prof


def read_profile_file(path: str | os.PathLike[str]) -> Profile:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ProfileError(f"{p}: {size} bytes is larger than any kvzip profile")
        data = p.read_bytes()
    except OSError as exc:
        raise ProfileNotFoundError(f"cannot read profile {p}: {exc.strerror or exc}") from None
    return profile_from_bytes(data, str(p), p)


_CACHE: dict[str, Profile] = {}


def register_profile_file(path: str | os.PathLike[str]) -> Profile:
    """Load ``path`` and make it findable by digest here and in child processes."""
    prof = read_profile_file(path)
    _CACHE[prof.digest] = prof
    resolved = str(Path(path).resolve())
    paths = [p for p in os.environ.get(_ENV_PATH, "").split(os.pathsep) if p]
    if resolved not in paths:
        os.environ[_ENV_PATH] = os.pathsep.join([*paths, resolved])
    return prof


def is_digest(spec: object) -> bool:
    """Whether ``spec`` names a profile by digest: 64 lowercase hex digits."""
    return isinstance(spec, str) and len(spec) == 64 and all(c in "0123456789abcdef" for c in spec)


def find_profile(digest: str) -> Profile:
    """The profile whose file bytes hash to ``digest``; ProfileNotFoundError if none is reachable."""
    if not is_digest(digest):
        raise ProfileError(f"a profile is named by a 64-digit lowercase hex SHA-256, not {digest!r}")
    hit = _CACHE.get(digest)
    if hit is not None:
        return hit
    candidates = [Path(p) for p in os.environ.get(_ENV_PATH, "").split(os.pathsep) if p]
    candidates += [d / f"{digest}{PROFILE_SUFFIX}" for d in profile_dirs()]
    for c in candidates:
        if not c.is_file():
            continue
        prof = read_profile_file(c)
        if prof.digest == digest:
            _CACHE[digest] = prof
            return prof
        if c.name == f"{digest}{PROFILE_SUFFIX}":
            raise ProfileMismatchError(f"{c} is named for profile {digest[:12]} but its bytes hash to {prof.digest[:12]}")
    where = ", ".join(str(d) for d in profile_dirs())
    raise ProfileNotFoundError(
        f"profile {digest[:12]}… is not in {where}; copy its .kvzprofile file there, "
        f"set {_ENV_DIR}, or pass --profile FILE"
    )


def list_profiles(model_fingerprint: str | None = None) -> list[Profile]:
    """Profiles in the profile directories (newest first), optionally for one model."""
    found: list[tuple[float, Profile]] = []
    for d in profile_dirs():
        if not d.is_dir():
            continue
        for f in d.glob(f"*{PROFILE_SUFFIX}"):
            try:
                with safe_open(str(f), "np") as st:
                    meta = json.loads((st.metadata() or {}).get("kvzip", "{}"))
            except (SafetensorError, OSError, ValueError):
                continue
            if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
                continue
            try:
                prof = read_profile_file(f)
            except ProfileError:
                continue
            found.append((f.stat().st_mtime, prof))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]
