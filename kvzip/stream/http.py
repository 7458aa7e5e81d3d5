"""HTTP for the client: a byte-range :class:`ByteSource` and bounded JSON fetches.

The server is distrusted.  A 200 where a 206 was asked, a ``Content-Range``
that is not the range asked for, an ETag that changes between requests, a body
shorter or longer than promised, or a compressed body is a :class:`FetchError`
with a one-line message, never silently accepted: a ``.kvz`` read from a file
that changed halfway would splice two caches together.  Connection failures,
5xx answers and short bodies are retried with exponential backoff, a bounded
number of times, since those are what a flaky link or a restarting server does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from kvzip.errors import FetchError
from kvzip.formats.source import checked_range
from kvzip.formats.spec import FIRST_READ_BYTES
from kvzip.stream.ranges import parse_content_range, range_header

T = TypeVar("T")

MAX_JSON_BYTES = 64 << 20  # a manifest of the largest context the format allows fits
USER_AGENT = "kvzip-stream"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    attempts: int = 4
    base_delay: float = 0.2  # seconds before the first retry, doubled for each next one
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt)


class TransientError(Exception):
    """A failure worth retrying (connection reset, 5xx, short body); internal to this module."""


def new_client(timeout: float = 30.0) -> httpx.Client:
    """An httpx client as kvzip uses it (every request also asks for an identity encoding,
    so that byte ranges are file bytes, whichever client a caller passes)."""
    return httpx.Client(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=True,
        max_redirects=5,
    )


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """``call()``, retried on :class:`TransientError` and transport errors; then :class:`FetchError`."""
    last = ""
    for attempt in range(policy.attempts):
        if attempt:
            time.sleep(policy.delay(attempt - 1))
        try:
            return call()
        except TransientError as exc:
            last = str(exc)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise FetchError(f"{what}: {last} (gave up after {policy.attempts} attempts)")


def _check_status(response: httpx.Response, what: str) -> None:
    if response.status_code >= 500:
        raise TransientError(f"server error HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise FetchError(f"{what}: server sent a {encoding}-encoded body after identity was asked")


def _whole_body_length(response: httpx.Response, what: str) -> int | None:
    """Check a whole-body (200) answer; its declared Content-Length, if any."""
    _check_status(response, what)
    if response.status_code != 200:
        raise FetchError(f"{what}: HTTP {response.status_code} {response.reason_phrase}")
    declared = response.headers.get("content-length")
    return int(declared) if declared and declared.isdigit() else None


def _read_body(response: httpx.Response, expected: int | None, limit: int, what: str) -> bytes:
    """The body, refusing more than ``limit`` (or than ``expected``) bytes; short is transient."""
    cap = limit if expected is None else expected
    parts, received = [], 0
    for piece in response.iter_bytes():  # identity-encoded (checked), so these are raw bytes
        received += len(piece)
        if received > cap:
            raise FetchError(f"{what}: server sent more than the {cap} bytes expected")
        parts.append(piece)
    if expected is not None and received != expected:
        raise TransientError(f"truncated body: received {received} of {expected} bytes")
    return b"".join(parts)


def get_json(
    client: httpx.Client, url: str, policy: RetryPolicy = RetryPolicy()
) -> tuple[Any, float]:
    """GET ``url`` as JSON (at most :data:`MAX_JSON_BYTES`), retrying transient failures.

    Returns the value and the rate its body arrived at (bytes/s, from the first
    header to the last byte: the server's time to answer is not the link's).
    """

    def attempt() -> tuple[Any, float]:
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            expected = _whole_body_length(response, url)
            if expected is not None and expected > MAX_JSON_BYTES:
                raise FetchError(f"{url}: JSON body of {expected} bytes exceeds {MAX_JSON_BYTES}")
            started = time.perf_counter()
            body = _read_body(response, expected, MAX_JSON_BYTES, url)
            rate = len(body) / max(time.perf_counter() - started, 1e-6)
        try:
            return json.loads(body), rate
        except ValueError:
            raise FetchError(f"{url}: response is not JSON") from None

    return with_retries(attempt, url, policy)


def get_body(
    client: httpx.Client, url: str, what: str, limit: int, expected: int | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> bytes:
    """GET ``url``'s whole body (at most ``limit`` bytes; exactly ``expected`` when given).

    A declared or received length other than ``expected`` is refused; a body cut
    short is retried like any transient failure, then a :class:`FetchError`.
    """

    def attempt() -> bytes:
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            length = _whole_body_length(response, what)
            if length is not None and expected is not None and length != expected:
                raise FetchError(f"{what}: server announced {length} bytes where {expected} were expected")
            if length is not None and length > limit:
                raise FetchError(f"{what}: body of {length} bytes exceeds {limit}")
            cap = limit if expected is None else expected
            body = _read_body(response, length if length is not None else expected, cap, what)
        if expected is not None and len(body) != expected:
            raise TransientError(f"truncated body: received {len(body)} of {expected} bytes")
        return body

    return with_retries(attempt, what, policy)


class HttpRangeSource:
    """A :class:`~kvzip.formats.source.ByteSource` over one URL, read with Range requests.

    ``size()`` costs one request, which also fetches the first
    ``FIRST_READ_BYTES`` the reader asks for next, so opening a ``.kvz`` over HTTP
    takes one request (two when its header and index are larger).  Pass the
    ``etag`` and ``size`` a manifest promised to skip that probe and refuse a
    file that no longer matches them.
    """

    def __init__(
        self,
        url: str,
        client: httpx.Client | None = None,
        *,
        etag: str | None = None,
        size: int | None = None,
        policy: RetryPolicy = RetryPolicy(),
    ):
        self.url = url
        self.etag = etag
        self._client = client or new_client()
        self._owns_client = client is None
        self._policy = policy
        self._size = size
        self._head = b""  # the first bytes, kept from the size probe
        self.bytes_received = 0  # body bytes of every successful request...
        self.body_seconds = 0.0  # ...and the time they took from headers to last byte

    def size(self) -> int:
        if self._size is None:
            self._head = self._fetch(0, FIRST_READ_BYTES, probe=True)
        assert self._size is not None
        return self._size

    def get_bytes(self, offset: int, length: int) -> bytes:
        start, end = checked_range(offset, length, self.size())
        if end <= len(self._head):
            return self._head[start:end]
        if length == 0:
            return b""
        return self._fetch(offset, length)

    def _fetch(self, offset: int, length: int, probe: bool = False) -> bytes:
        what = f"{self.url} bytes {offset}-{offset + length - 1}"
        return with_retries(lambda: self._fetch_once(offset, length, probe), what, self._policy)

    def _fetch_once(self, offset: int, length: int, probe: bool) -> bytes:
        headers = {"Range": range_header(offset, length), "Accept-Encoding": "identity"}
        if self.etag and not self.etag.startswith("W/"):  # If-Range needs a strong validator
            headers["If-Range"] = self.etag
        with self._client.stream("GET", self.url, headers=headers) as response:
            _check_status(response, self.url)
            etag = response.headers.get("etag")
            if self.etag is not None and etag != self.etag:
                raise FetchError(
                    f"{self.url} changed on the server (ETag {self.etag} became {etag}); "
                    "fetch it again from the start"
                )
            if response.status_code == 200:
                raise FetchError(
                    f"{self.url}: server answered 200 (the whole file) to a Range request; "
                    "it must support byte ranges (HTTP 206)"
                )
            if response.status_code != 206:
                raise FetchError(f"{self.url}: HTTP {response.status_code} {response.reason_phrase}")
            got = parse_content_range(response.headers.get("content-range", ""))
            if got is None:
                raise FetchError(
                    f"{self.url}: malformed Content-Range {response.headers.get('content-range')!r}"
                )
            if self._size is not None and got.total != self._size:
                raise FetchError(
                    f"{self.url} changed size on the server ({self._size} -> {got.total} bytes)"
                )
            want_end = min(offset + length, got.total) if probe else offset + length
            if (got.start, got.end) != (offset, want_end):
                raise FetchError(
                    f"{self.url}: server sent bytes {got.start}-{got.end - 1} "
                    f"where {offset}-{want_end - 1} were asked"
                )
            started = time.perf_counter()
            body = _read_body(response, got.length, got.length, self.url)
            self.body_seconds += time.perf_counter() - started
        if probe:
            self._size, self.etag = got.total, etag
        self.bytes_received += len(body)
        return body

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
