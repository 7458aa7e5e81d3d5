"""Passage artifacts (``.kvz`` files) on any fsspec URL: a local directory or object storage.

Every write is atomic, so a reader (or a crashed writer's successor) sees a whole
artifact or none: locally, :class:`~kvzip.formats.KvzWriter` writes a temporary
sibling and renames it; on object storage, the file is built locally and uploaded
with one PUT, which stores a whole object or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kvzip.errors import InputError
from kvzip.formats import BytesSource
from kvzip.levels import CacheFile, level_config, open_cache

ARTIFACT_SUFFIX = ".kvz"


def codec_sha256(level: str, profile: str | None = None, treatment: dict | None = None) -> str:
    """Hash of the codec config behind ``level`` (calibrated with ``profile``, a digest;
    with ``treatment``, what else the artifact was stored with: the importance header record
    (scorer, classes' shares and factors) and/or ``keep``, hashed under the config key
    ``"importance"``, the name it had before ``--keep``, so existing names stay valid)."""
    config = level_config(level, profile)
    if treatment is not None:  # absent otherwise: the hashes of plain artifacts are unchanged
        config = {**config, "importance": treatment}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def artifact_name(model: str, level: str, dtype: str, tokens_sha: str, profile: str | None = None,
                  treatment: dict | None = None) -> str:
    """The content address of a cache: model, codec config (see :func:`codec_sha256`),
    dtype and token ids."""
    key = hashlib.sha256(
        f"{model}\n{codec_sha256(level, profile, treatment)}\n{dtype}\n{tokens_sha}".encode()
    ).hexdigest()
    return f"{key[:2]}/{key}{ARTIFACT_SUFFIX}"


class ArtifactStore:
    """Named artifacts under one root URL; names are relative paths such as ``ab/abcd….kvz``."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise InputError(f"cannot use artifact location {url!r}: {exc}") from None
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def write(self, name: str, write_file: Callable[[Path], Any]) -> int:
        """Create artifact ``name`` through ``write_file(local_path)``; returns its size."""
        target = self.path(name)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            write_file(Path(target))  # atomic: KvzWriter renames a finished sibling
            return os.path.getsize(target)
        with tempfile.TemporaryDirectory(prefix="kvzip-artifact-") as tmp:
            local = Path(tmp) / Path(name).name
            write_file(local)
            self.fs.put_file(str(local), target)
            return local.stat().st_size

    def open(self, name: str) -> CacheFile:
        """The artifact opened for decoding (fetched whole when it is remote)."""
        target = self.path(name)
        try:
            if self.is_local:
                if not os.path.isfile(target):
                    raise FileNotFoundError(target)
                return open_cache(target)
            return open_cache(BytesSource(self.fs.cat_file(target)))
        except FileNotFoundError:
            raise InputError(
                f"artifact {name} is missing from {self.url} (run `kvzip store verify`)"
            ) from None

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def listing(self) -> list[StoredFile]:
        """Every file under the root: artifacts, and the hidden temporaries an interrupted
        local write leaves beside them (gc removes those once no writer can own them)."""
        if not self.fs.exists(self.root):
            return []
        now = time.time()
        files = []
        for full, info in sorted(self.fs.find(self.root, detail=True).items()):
            name = full[len(self.root) :].lstrip("/")
            temporary = Path(name).name.startswith(".")
            if temporary or name.endswith(ARTIFACT_SUFFIX):
                modified = _modified(info)
                age = None if modified is None else now - modified
                files.append(StoredFile(name, age, temporary))
        return files


@dataclass(frozen=True)
class StoredFile:
    name: str
    age: float | None  # seconds since it was last written, where the backend tells
    temporary: bool


def _modified(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time as a POSIX timestamp, where the backend gives one."""
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
