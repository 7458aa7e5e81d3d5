"""Where calibration profiles live, and finding the one a level or a file names.

A profile (:class:`kvzip.codecs.profile.Profile`) is named by the SHA-256 of its
file bytes.  Where profiles are found, first match wins:

1. profiles loaded in this process (``--profile FILE``, :func:`register_profile_file`,
   or found before);
2. ``<dir>/<digest>.kvzprofile`` for each directory in ``KVZIP_PROFILE_DIR``
   (``os.pathsep``-separated), else the user cache directory
   (``platformdirs.user_cache_dir("kvzip")/profiles``; ``~/.cache/kvzip/profiles`` on Linux).

Codecs never look for profiles themselves: the levels layer finds the profile a
config names here and hands the object to the codec.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from kvzip.atomic import atomic_output
from kvzip.codecs.profile import (
    MAX_PROFILE_BYTES,
    PROFILE_SUFFIX,
    Profile,
    profile_from_bytes,
    read_profile_meta,
)
from kvzip.errors import ProfileError, ProfileMismatchError, ProfileNotFoundError

ENV_PROFILE_DIR = "KVZIP_PROFILE_DIR"
_LOADED: dict[str, Profile] = {}  # digest -> profile, for this process


def default_profile_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvzip")) / "profiles"


def profile_dirs() -> list[Path]:
    env = os.environ.get(ENV_PROFILE_DIR)
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [default_profile_dir()]


def is_digest(spec: object) -> bool:
    """Whether ``spec`` names a profile by digest: 64 lowercase hex digits."""
    return isinstance(spec, str) and len(spec) == 64 and all(c in "0123456789abcdef" for c in spec)


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


def register_profile_file(path: str | os.PathLike[str]) -> Profile:
    """Load ``path`` and make it findable by digest in this process."""
    prof = read_profile_file(path)
    _LOADED[prof.digest] = prof
    return prof


def registered_profile_files() -> list[Path]:
    """The files of the profiles this process loaded by path (``--profile FILE``)."""
    return [p.path for p in _LOADED.values() if p.path is not None]


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
    _LOADED[prof.digest] = prof
    return prof


def find_profile(digest: str) -> Profile:
    """The profile whose file bytes hash to ``digest``; ProfileNotFoundError if none is reachable."""
    if not is_digest(digest):
        raise ProfileError(f"a profile is named by a 64-digit lowercase hex SHA-256, not {digest!r}")
    hit = _LOADED.get(digest)
    if hit is not None:
        return hit
    for directory in profile_dirs():
        candidate = directory / f"{digest}{PROFILE_SUFFIX}"
        if not candidate.is_file():
            continue
        prof = read_profile_file(candidate)
        if prof.digest != digest:
            raise ProfileMismatchError(
                f"{candidate} is named for profile {digest[:12]} but its bytes hash to {prof.digest[:12]}")
        _LOADED[digest] = prof
        return prof
    where = ", ".join(str(d) for d in profile_dirs())
    raise ProfileNotFoundError(
        f"profile {digest[:12]}… is not in {where}; copy its .kvzprofile file there, "
        f"set {ENV_PROFILE_DIR}, or pass --profile FILE"
    )


def list_profiles(model_fingerprint: str | None = None) -> list[Profile]:
    """Profiles in the profile directories (newest first), optionally for one model.

    Only each file's safetensors header is read to pick the model's; the files that
    match are then loaded and validated whole (a damaged one is skipped)."""
    found: list[tuple[float, Profile]] = []
    for d in profile_dirs():
        if not d.is_dir():
            continue
        for f in d.glob(f"*{PROFILE_SUFFIX}"):
            try:
                with open(f, "rb") as handle:
                    meta = read_profile_meta(handle.read(8 + (1 << 20)), str(f))
                if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
                    continue
                prof = read_profile_file(f)
            except (OSError, ProfileError):
                continue
            found.append((f.stat().st_mtime, prof))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]
