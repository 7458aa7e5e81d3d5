"""HTTP for the client: a byte-range :class:`ByteSource` and bounded JSON fetches.

The server is distrusted.  A 200 where a 206 was asked, a ``Content-Range``
that is not the range asked for, an ETag that changes between requests, a body
shorter or longer than promised, or a compressed body is a :class:`FetchError`
with a one-line message, never silently accepted: a ``.kvz`` read from a file
that changed halfway would splice two caches together.  Connection failures,
5xx answers and short bodies are retried with exponential backoff, a bounded
number of times, since those are what a flaky link or a restarting server does.

Every request also obeys the :class:`DownloadLimits` of the download it is
part of (a :class:`Budget`: the limits and the moment the download began): an
overall deadline (a server sending one byte a second cannot hold a client
forever; no single read waits past it either), a minimum speed each body must
average over every window of a few seconds, and a redirect rule: redirects
within the URL's origin (scheme, host and port) are followed, a bounded number
of times and with the same headers (so a range request stays the range asked
for), and a redirect to another origin is refused unless the limits allow it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from kvzip.errors import FetchError, InputError
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


DEFAULT_MAX_SECONDS = 3600.0  # a whole download; generous, but a hostile server cannot hold us
DEFAULT_MIN_SPEED = 1024.0  # bytes/s a body must average...
DEFAULT_SPEED_WINDOW = 30.0  # ...over every window of this many seconds
DEFAULT_MAX_REDIRECTS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class DownloadLimits:
    """How long a download may take, how slowly its bodies may arrive, where it may be redirected.

    ``max_seconds``: the whole download (every request, retries and backoff
    included), None for no limit.  ``min_speed``: bytes/s each response body
    must average over every ``min_speed_window`` seconds while it is read (0: no
    minimum).  ``allow_other_hosts``: follow a redirect to another origin
    (scheme, host or port); same-origin redirects are always followed, at most
    ``max_redirects`` per request.  The messages name the CLI options.
    """

    max_seconds: float | None = DEFAULT_MAX_SECONDS
    min_speed: float = DEFAULT_MIN_SPEED
    min_speed_window: float = DEFAULT_SPEED_WINDOW
    allow_other_hosts: bool = False
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    def __post_init__(self) -> None:
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise InputError(f"--max-download-seconds must be a positive number of seconds, "
                             f"got {self.max_seconds}")
        if not (self.min_speed >= 0 and math.isfinite(self.min_speed)):
            raise InputError(f"--min-speed must be a number of bytes/s, 0 or more, got {self.min_speed}")
        if not (self.min_speed_window > 0 and math.isfinite(self.min_speed_window)):
            raise InputError(f"--min-speed-window must be a positive number of seconds, "
                             f"got {self.min_speed_window}")
        if self.max_redirects < 0:
            raise InputError(f"max_redirects must be 0 or more, got {self.max_redirects}")

    def start(self) -> Budget:
        """The clock of one download under these limits, started now."""
        return Budget(self)


class Budget:
    """One download under its :class:`DownloadLimits`: the limits, and when it began."""

    def __init__(self, limits: DownloadLimits = DownloadLimits()):
        self.limits = limits
        self.started = time.monotonic()

    def remaining(self) -> float:
        """Seconds left before the deadline (infinite without one; negative once past it)."""
        if self.limits.max_seconds is None:
            return math.inf
        return self.limits.max_seconds - (time.monotonic() - self.started)

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            raise FetchError(
                f"{what}: the download took longer than {self.limits.max_seconds:g} s "
                "(--max-download-seconds to allow more)"
            )

    def timeout(self, client: httpx.Client) -> httpx.Timeout:
        """The client's timeouts, none longer than the time left (so no read waits past the deadline)."""
        left = self.remaining()
        t = client.timeout

        def cap(value: float | None) -> float | None:
            if math.isinf(left):
                return value
            return max(1e-3, left if value is None else min(value, left))

        return httpx.Timeout(connect=cap(t.connect), read=cap(t.read), write=cap(t.write), pool=cap(t.pool))


class _SpeedCheck:
    """The minimum-speed rule for one body: every ``min_speed_window`` seconds (or the first
    byte after), the bytes since the last check must average at least ``min_speed`` bytes/s."""

    def __init__(self, limits: DownloadLimits, what: str):
        self.limits, self.what = limits, what
        self.since, self.at = time.monotonic(), 0

    def update(self, received: int) -> None:
        limits = self.limits
        if not limits.min_speed:
            return
        now = time.monotonic()
        elapsed = now - self.since
        if elapsed < limits.min_speed_window:
            return
        got = received - self.at
        if got < limits.min_speed * elapsed:
            raise FetchError(
                f"{self.what}: the server sent {got} bytes in {elapsed:.1f} s, slower than the "
                f"minimum of {limits.min_speed:g} bytes/s over {limits.min_speed_window:g} s "
                "(--min-speed and --min-speed-window to change it)"
            )
        self.since, self.at = now, received


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _show_origin(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS.get(scheme) else f"{scheme}://{host}:{port}"


@contextmanager
def open_get(
    client: httpx.Client, url: str, headers: dict[str, str], budget: Budget, what: str
) -> Iterator[httpx.Response]:
    """GET ``url`` as a stream, following redirects under ``budget``'s rule; the final response.

    Each hop is sent again with ``headers`` (Range, If-Range...), so a range
    request that was redirected asks for the same range.  A redirect to another
    origin than ``url``'s is a :class:`FetchError` unless the limits allow it.
    """
    limits = budget.limits
    current = httpx.URL(url)
    origin = _origin(current)
    for _hop in range(limits.max_redirects + 1):
        budget.check(what)
        request = client.build_request("GET", current, headers=headers, timeout=budget.timeout(client))
        if _origin(current) != origin:
            request.headers.pop("authorization", None)  # a caller's credentials stay with its host
        response = client.send(request, stream=True, follow_redirects=False)
        if not response.is_redirect:
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        try:
            target = current.join(response.headers["location"])
        except httpx.InvalidURL:
            raise FetchError(f"{what}: the server redirects to an invalid URL "
                             f"{response.headers['location'][:200]!r}") from None
        if target.scheme not in _DEFAULT_PORTS:
            raise FetchError(f"{what}: the server redirects to a {target.scheme}: URL, not http(s); "
                             "refused")
        if _origin(target) != origin and not limits.allow_other_hosts:
            raise FetchError(
                f"{what}: the server redirects (HTTP {response.status_code}) to "
                f"{_show_origin(_origin(target))}, another origin than {_show_origin(origin)}; "
                "refused (--allow-redirects-to-other-hosts to follow it)"
            )
        current = target
    raise FetchError(f"{what}: more than {limits.max_redirects} redirects; refused")


class TransientError(Exception):
    """A failure worth retrying (connection reset, 5xx, short body); internal to this module."""


def new_client(timeout: float = 30.0) -> httpx.Client:
    """An httpx client as kvzip uses it (every request also asks for an identity encoding,
    so that byte ranges are file bytes, and follows redirects by :func:`open_get`'s rule,
    whichever client a caller passes).  ``timeout`` is per read, not per download: see
    :class:`DownloadLimits`."""
    return httpx.Client(
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy, budget: Budget | None = None) -> T:
    """``call()``, retried on :class:`TransientError` and transport errors; then :class:`FetchError`.

    With a ``budget``, no attempt starts (and no backoff sleeps) past its deadline."""
    last = ""
    for attempt in range(policy.attempts):
        if budget is not None:
            budget.check(what)
        if attempt:
            delay = policy.delay(attempt - 1)
            time.sleep(delay if budget is None else max(0.0, min(delay, budget.remaining())))
            if budget is not None:
                budget.check(what)
        try:
            return call()
        except TransientError as exc:
            last = str(exc)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if budget is not None:
        budget.check(what)  # a read cut short by the deadline says so
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


def _read_body(response: httpx.Response, expected: int | None, limit: int, what: str,
               budget: Budget) -> bytes:
    """The body, refusing more than ``limit`` (or than ``expected``) bytes; short is transient.

    A body slower than the budget's minimum speed, or still arriving at its deadline,
    is a :class:`FetchError` (not retried: the next attempt would be as slow)."""
    cap = limit if expected is None else expected
    parts, received = [], 0
    speed = _SpeedCheck(budget.limits, what)
    for piece in response.iter_bytes():  # identity-encoded (checked), so these are raw bytes
        received += len(piece)
        if received > cap:
            raise FetchError(f"{what}: server sent more than the {cap} bytes expected")
        parts.append(piece)
        budget.check(what)
        speed.update(received)
    if expected is not None and received != expected:
        raise TransientError(f"truncated body: received {received} of {expected} bytes")
    return b"".join(parts)


def get_json(
    client: httpx.Client, url: str, policy: RetryPolicy = RetryPolicy(), budget: Budget | None = None
) -> tuple[Any, float]:
    """GET ``url`` as JSON (at most :data:`MAX_JSON_BYTES`), retrying transient failures.

    Returns the value and the rate its body arrived at (bytes/s, from the first
    header to the last byte: the server's time to answer is not the link's).
    ``budget``: the download this request is part of (default: one of its own,
    under the default :class:`DownloadLimits`).
    """
    budget = budget or Budget()

    def attempt() -> tuple[Any, float]:
        with open_get(client, url, {"Accept-Encoding": "identity"}, budget, url) as response:
            expected = _whole_body_length(response, url)
            if expected is not None and expected > MAX_JSON_BYTES:
                raise FetchError(f"{url}: JSON body of {expected} bytes exceeds {MAX_JSON_BYTES}")
            started = time.perf_counter()
            body = _read_body(response, expected, MAX_JSON_BYTES, url, budget)
            rate = len(body) / max(time.perf_counter() - started, 1e-6)
        try:
            return json.loads(body), rate
        except ValueError:
            raise FetchError(f"{url}: response is not JSON") from None

    return with_retries(attempt, url, policy, budget)


def get_body(
    client: httpx.Client, url: str, what: str, limit: int, expected: int | None = None,
    policy: RetryPolicy = RetryPolicy(), budget: Budget | None = None,
) -> bytes:
    """GET ``url``'s whole body (at most ``limit`` bytes; exactly ``expected`` when given).

    A declared or received length other than ``expected`` is refused; a body cut
    short is retried like any transient failure, then a :class:`FetchError`.
    """
    budget = budget or Budget()

    def attempt() -> bytes:
        with open_get(client, url, {"Accept-Encoding": "identity"}, budget, what) as response:
            length = _whole_body_length(response, what)
            if length is not None and expected is not None and length != expected:
                raise FetchError(f"{what}: server announced {length} bytes where {expected} were expected")
            if length is not None and length > limit:
                raise FetchError(f"{what}: body of {length} bytes exceeds {limit}")
            cap = limit if expected is None else expected
            body = _read_body(response, length if length is not None else expected, cap, what, budget)
        if expected is not None and len(body) != expected:
            raise TransientError(f"truncated body: received {len(body)} of {expected} bytes")
        return body

    return with_retries(attempt, what, policy, budget)


class HttpRangeSource:
    """A :class:`~kvzip.formats.source.ByteSource` over one URL, read with Range requests.

    ``size()`` costs one request, which also fetches the first
    ``FIRST_READ_BYTES`` the reader asks for next, so opening a ``.kvz`` over HTTP
    takes one request (two when its header and index are larger).  Pass the
    ``etag`` and ``size`` a manifest promised to skip that probe and refuse a
    file that no longer matches them.  ``budget``: the download its requests are
    part of (default: each request on its own, under the default
    :class:`DownloadLimits`).
    """

    def __init__(
        self,
        url: str,
        client: httpx.Client | None = None,
        *,
        etag: str | None = None,
        size: int | None = None,
        policy: RetryPolicy = RetryPolicy(),
        budget: Budget | None = None,
    ):
        self.url = url
        self.budget = budget
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
        budget = self.budget or Budget()
        return with_retries(lambda: self._fetch_once(offset, length, probe, budget), what,
                            self._policy, budget)

    def _fetch_once(self, offset: int, length: int, probe: bool, budget: Budget) -> bytes:
        headers = {"Range": range_header(offset, length), "Accept-Encoding": "identity"}
        if self.etag and not self.etag.startswith("W/"):  # If-Range needs a strong validator
            headers["If-Range"] = self.etag
        with open_get(self._client, self.url, headers, budget, self.url) as response:
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
            body = _read_body(response, got.length, got.length, self.url, budget)
            self.body_seconds += time.perf_counter() - started
        if probe:
            self._size, self.etag = got.total, etag
        self.bytes_received += len(body)
        return body

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
