"""Confinement: which URL paths name a ``.kvz`` under the served root, and nothing else.

Every path the server touches goes through :func:`resolve_context`.  The URL
path arrives percent-decoded (``%2e%2e`` is already ``..``), so dot segments,
backslashes and NUL are refused outright (400); anything that resolves outside
the root, through ``..`` or a symlink, or that is hidden, missing or not a
regular ``.kvz`` file is simply not found (404), so the answer does not tell an
attacker what exists outside.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

MAX_PATH_CHARS = 1024
MAX_CONTEXTS = 10_000  # a listing stops here, so one request cannot walk a whole disk
SUFFIX = ".kvz"


class PathRejected(Exception):
    """A URL path that names no servable context; ``status`` is 400 or 404."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_name(name: str) -> list[str]:
    """The segments of URL path ``name`` if it may name something under the root.

    400 for what no honest client sends (dot segments, NUL, backslashes, empty
    segments, absolute paths, overlong paths); 404 for empty and hidden names.
    """
    if not name:
        raise PathRejected(404, "not found")
    if len(name) > MAX_PATH_CHARS:
        raise PathRejected(400, f"path longer than {MAX_PATH_CHARS} characters")
    if "\x00" in name or "\\" in name:
        raise PathRejected(400, "path holds a NUL byte or a backslash")
    segments = name.split("/")
    if name.startswith("/") or any(s in ("", ".", "..") for s in segments):
        raise PathRejected(400, "path must be relative, without empty, '.' or '..' segments")
    if any(s.startswith(".") for s in segments):
        raise PathRejected(404, "not found")
    return segments


def resolve_directory(root: Path, segments: list[str]) -> Path:
    """The real directory ``root/segments...``, which must lie inside ``root``; else 404."""
    try:
        real = root.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):
        raise PathRejected(404, "not found") from None
    if not real.is_relative_to(root) or not real.is_dir():
        raise PathRejected(404, "not found")
    return real


def resolve_context(root: Path, name: str) -> Path:
    """The real path of context ``name`` (``a/b.kvz``, relative to ``root``, already resolved)."""
    check_name(name)
    if not name.endswith(SUFFIX):
        raise PathRejected(404, "not found")
    try:
        real = (root / name).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        raise PathRejected(404, "not found") from None
    if not real.is_relative_to(root) or not real.is_file():
        raise PathRejected(404, "not found")
    return real


def list_contexts(root: Path) -> Iterator[str]:
    """Names of the servable ``.kvz`` files under ``root``, sorted, at most :data:`MAX_CONTEXTS`.

    Symlinked directories are not followed; symlinked files are listed only
    when they resolve inside the root, the same rule :func:`resolve_context` applies.
    """
    found = 0
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith(".") or not file.endswith(SUFFIX):
                continue
            name = Path(directory, file).relative_to(root).as_posix()
            try:
                resolve_context(root, name)
            except PathRejected:
                continue
            yield name
            found += 1
            if found >= MAX_CONTEXTS:
                return
