"""Calibration profiles over HTTP: which ones a ``.kvz`` names, serving them, fetching them.

A ``.kvz`` coded with ``kvzip-profile`` names its profile by SHA-256 in each
level's codec config (and, with its size, in the header's ``profile`` entry);
decoding needs ``<digest>.kvzprofile``.  Profiles are content-addressed, so
where the bytes come from does not matter as long as they hash to the digest.

Server (:class:`ProfileStore`): ``GET /profiles/<digest>.kvzprofile`` (and
``GET /<dir>/<digest>.kvzprofile``, the plain-file rule below) serves

* any ``<digest>.kvzprofile`` file under the served root (symlinks that leave
  the root excepted, as for ``.kvz`` files), and
* for a digest that some served ``.kvz`` names, the file of that name in the
  profile directories the server was started with (``KVZIP_PROFILE_DIR``, else
  ``~/.cache/kvzip/profiles``) or a file registered with ``--profile``;

and only a file whose bytes do hash to the digest (checked once per file
identity), so a stale or damaged copy is never handed out.

Client (:func:`ensure_profiles`): for each profile a file needs that
:func:`~kvzip.levels.profiles.find_profile` cannot find here, download it from
the URL the manifest gives, or for a plain ``.kvz`` URL from
``<same directory>/<digest>.kvzprofile``; refuse it unless its SHA-256 is the
digest (and its size the one the file names); then store it atomically in the
first profile directory with :func:`~kvzip.levels.profiles.write_profile`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from kvzip.codecs.profile import MAX_PROFILE_BYTES, PROFILE_SUFFIX, profile_from_bytes
from kvzip.errors import KvzipError, ProfileMismatchError, ProfileNotFoundError
from kvzip.formats import KvzHeader, open_kvz
from kvzip.levels import find_profile, is_digest, profile_dirs, registered_profile_files, write_profile
from kvzip.stream.http import Budget, RetryPolicy, get_body
from kvzip.stream.paths import MAX_CONTEXTS, list_contexts

SCAN_SECONDS = 2.0  # the root is walked for profiles and named digests at most this often
HASH_PIECE = 1 << 20
_VERIFIED_CACHE = 256


def profile_file_name(digest: str) -> str:
    return f"{digest}{PROFILE_SUFFIX}"


def profile_url(digest: str) -> str:
    """Server path of a profile."""
    return f"/profiles/{profile_file_name(digest)}"


def digest_from_file_name(name: str) -> str | None:
    """``<digest>.kvzprofile`` -> digest; None for any other name."""
    stem = name.removesuffix(PROFILE_SUFFIX)
    return stem if stem != name and is_digest(stem) else None


# -------------------------------------------------------------------------- client
@dataclass(frozen=True)
class ProfileRef:
    """Where a client can get one profile: its digest, absolute URL and size (if known)."""

    digest: str
    url: str
    size: int | None = None


def plain_profile_ref(file_url: str, header: KvzHeader, digest: str) -> ProfileRef:
    """The profile beside a ``.kvz`` on a plain server: ``<same directory>/<digest>.kvzprofile``."""
    url = str(httpx.URL(file_url).join(profile_file_name(digest)))
    return ProfileRef(digest, url, header.profile_bytes(digest))


@dataclass
class ProfileStatus:
    """A profile a file needs, after :func:`ensure_profiles`."""

    digest: str
    path: str
    bytes: int
    fetched: bool  # downloaded now (False: this machine had it)
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ensure_profiles(
    refs: Sequence[ProfileRef], client: httpx.Client, policy: RetryPolicy = RetryPolicy(),
    budget: Budget | None = None,
) -> list[ProfileStatus]:
    """Make every profile in ``refs`` findable here, downloading those this machine lacks
    (within ``budget``: the download they are part of)."""
    done = []
    for ref in refs:
        try:
            prof = find_profile(ref.digest)
        except ProfileNotFoundError:
            data = download_profile(ref, client, policy, budget)
            prof = write_profile(data)
            done.append(ProfileStatus(ref.digest, str(prof.path), prof.size, True, ref.url))
        else:
            done.append(ProfileStatus(ref.digest, str(prof.path), prof.size, False))
    return done


def download_profile(ref: ProfileRef, client: httpx.Client, policy: RetryPolicy = RetryPolicy(),
                     budget: Budget | None = None) -> bytes:
    """The bytes of ``ref``, refused unless they hash to its digest and parse as a profile."""
    short = ref.digest[:12]
    what = f"profile {short}… from {ref.url}"
    data = get_body(client, ref.url, what, MAX_PROFILE_BYTES, ref.size, policy, budget)
    got = hashlib.sha256(data).hexdigest()
    if got != ref.digest:
        raise ProfileMismatchError(
            f"{what}: its bytes hash to {got[:12]}…, not the digest the file names; refused"
        )
    profile_from_bytes(data, what)  # a readable, well-formed profile (ProfileError if not)
    return data


# -------------------------------------------------------------------------- server
def _kvz_digests(path: Path) -> tuple[str, ...]:
    """The profiles a ``.kvz`` names; none for a file that is not a valid ``.kvz``."""
    try:
        with open_kvz(path) as reader:
            return tuple(reader.header.profile_digests())
    except (KvzipError, OSError):
        return ()


@dataclass(frozen=True)
class _Scan:
    at: float
    named: frozenset[str]  # digests some served .kvz names
    in_root: dict[str, tuple[Path, ...]]  # digest -> <digest>.kvzprofile files under the root


class ProfileStore:
    """The profiles a server may hand out (see the module docstring); thread-safe.

    ``dirs`` and ``registered`` default to the profile directories and the
    registered files at the time the store is made: the server's configuration,
    fixed when it starts.
    """

    def __init__(self, root: Path, dirs: Sequence[str | os.PathLike[str]] | None = None,
                 registered: Sequence[str | os.PathLike[str]] | None = None):
        self.root = root
        self.dirs = [Path(d) for d in (profile_dirs() if dirs is None else dirs)]
        if registered is None:
            registered = registered_profile_files()
        self.registered = [Path(p) for p in registered]
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._scan: _Scan | None = None
        self._named_by_file: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._verified: OrderedDict[tuple[int, ...], str] = OrderedDict()

    def scan(self) -> _Scan:
        """Digests named under the root and profile files in it, rebuilt at most every SCAN_SECONDS
        (so a stream of requests for unknown digests cannot make the server walk its root on each)."""
        with self._scan_lock:
            now = time.monotonic()
            if self._scan is None or now - self._scan.at > SCAN_SECONDS:
                self._scan = self._rescan(now)
            return self._scan

    def _rescan(self, now: float) -> _Scan:
        named: set[str] = set()
        seen: dict[tuple[int, ...], tuple[str, ...]] = {}
        for name in list_contexts(self.root):
            path = self.root / name
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            digests = self._named_by_file.get(key)
            if digests is None:
                digests = _kvz_digests(path)
            seen[key] = digests
            named.update(digests)
        self._named_by_file = seen
        in_root: dict[str, list[Path]] = {}
        count = 0
        for directory, subdirs, files in os.walk(self.root, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file in sorted(files):
                digest = digest_from_file_name(file)
                if digest is not None:
                    in_root.setdefault(digest, []).append(Path(directory, file))
                    count += 1
            if count >= MAX_CONTEXTS:
                break
        return _Scan(now, frozenset(named), {d: tuple(p) for d, p in in_root.items()})

    def open(self, digest: str) -> int | None:
        """An open descriptor of a file that holds profile ``digest``; None if this server has none."""
        if not is_digest(digest):
            return None
        scan = self.scan()
        candidates = [(p, True) for p in scan.in_root.get(digest, ())]
        if digest in scan.named:
            candidates += [(d / profile_file_name(digest), False) for d in self.dirs]
            candidates += [(p, False) for p in self.registered]
        for path, inside_root in candidates:
            fd = self._open_verified(path, digest, inside_root)
            if fd is not None:
                return fd
        return None

    def size(self, digest: str) -> int | None:
        fd = self.open(digest)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _open_verified(self, path: Path, digest: str, inside_root: bool) -> int | None:
        """An open descriptor of ``path`` if it is a regular file whose bytes hash to ``digest``."""
        try:
            if inside_root:  # re-checked now: the file may have become a symlink since the walk
                real = path.resolve(strict=True)
                if not real.is_relative_to(self.root):
                    return None
                path = real
            fd = os.open(path, os.O_RDONLY)
        except (OSError, RuntimeError):
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PROFILE_BYTES:
                raise OSError("not a servable profile file")
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            with self._lock:
                known = self._verified.get(key)
            if known is None:
                known = _hash_fd(fd, st.st_size)
                with self._lock:
                    self._verified[key] = known
                    if len(self._verified) > _VERIFIED_CACHE:
                        self._verified.popitem(last=False)
            if known != digest:
                raise OSError("bytes do not hash to the digest")
        except OSError:
            os.close(fd)
            return None
        return fd


def _hash_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        piece = os.pread(fd, min(HASH_PIECE, size - offset), offset)
        if not piece:
            break
        h.update(piece)
        offset += len(piece)
    return h.hexdigest()
