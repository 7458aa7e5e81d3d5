"""``kvzip fetch``: download a ``.kvz`` over HTTP, verified and written atomically.

Works against kvzip's server and any static server that honours single byte
ranges.  The file is read with range requests pinned to one ETag (so a file
replaced on the server mid-download is an error, not a splice), its header and
index are validated before the first payload byte is fetched, and every
payload's checksum is checked before the file takes its final name.  A
calibration profile the file names and this machine lacks is fetched from
beside it (``<same directory>/<digest>.kvzprofile``), checked against its
digest and stored in the profile directory first.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kvzip import atomic
from kvzip.errors import FetchError, InputError
from kvzip.formats import KvzReader, open_kvz
from kvzip.formats.spec import FIRST_READ_BYTES
from kvzip.levels import Progress, no_progress
from kvzip.stream.http import DownloadLimits, HttpRangeSource, RetryPolicy, new_client
from kvzip.stream.profiles import ProfileStatus, ensure_profiles, plain_profile_ref

PIECE_BYTES = 4 << 20  # one range request; bounds memory whatever the file size


@dataclass
class FetchSummary:
    url: str
    path: str
    bytes: int
    payloads_verified: int
    etag: str | None
    seconds: float
    profiles: list[ProfileStatus] = field(default_factory=list)  # the profiles the file names

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fetch(
    url: str,
    out: str | os.PathLike[str],
    *,
    client: httpx.Client | None = None,
    policy: RetryPolicy = RetryPolicy(),
    limits: DownloadLimits = DownloadLimits(),
    progress: Progress = no_progress,
) -> FetchSummary:
    """Download the ``.kvz`` at ``url`` to ``out``; ``out`` is untouched unless all of it checks out.

    ``limits``: the whole download's deadline, the minimum speed of its bodies and
    whether redirects to another host are followed (every request: header,
    profiles, payloads); breaking one is a :class:`FetchError`."""
    started = time.perf_counter()
    target = Path(out)
    directory = target.parent
    if not directory.is_dir():
        raise InputError(f"output directory does not exist: {directory}")
    own_client = client is None
    client = client or new_client()
    budget = limits.start()
    source = HttpRangeSource(url, client, policy=policy, budget=budget)
    try:
        header = KvzReader(source).header  # refuse a non-.kvz before downloading it
        # The calibration profiles its codecs name, beside it on the server; fetched (and
        # checked against their digests) unless this machine has them.
        refs = [plain_profile_ref(url, header, d) for d in header.profile_digests()]
        profiles = ensure_profiles(refs, client, policy, budget)
        size = source.size()
        fd, tmp = atomic.create_temp(target, "part")
        try:
            with os.fdopen(fd, "wb") as handle:
                offset = 0
                while offset < size:
                    n = min(PIECE_BYTES if offset else FIRST_READ_BYTES, size - offset)
                    handle.write(source.get_bytes(offset, n))
                    offset += n
                    progress("fetch", offset, size)
            verified = _verify(tmp, url)
            atomic.commit(tmp, target)
        except BaseException:
            atomic.discard(tmp)
            raise
    finally:
        if own_client:
            client.close()
    return FetchSummary(url, str(target), size, verified, source.etag, time.perf_counter() - started,
                        profiles)


def _verify(path: Path, url: str) -> int:
    """Check every payload checksum of the downloaded file; the number of payloads checked."""
    with open_kvz(path) as reader:
        problems = reader.verify()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise FetchError(f"{url}: downloaded file is corrupt: {problems[0].message}{more}")
        return len(reader.entries)
