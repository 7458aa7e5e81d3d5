"""ASGI middleware for the server: request bounds and access log, and the test-only throttle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvzip.errors import InputError

access_log = logging.getLogger("kvzip.stream.access")

MAX_URL_CHARS = 2048
MAX_HEADER_BYTES = 16 << 10  # all request headers together


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the server sends: a JSON object with one ``error`` line."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Throttle:
    """Paces response bodies to emulate one slow link shared by every response.

    ``schedule`` is ``[(seconds, mbps), ...]``, cycled from when the throttle is
    made; one entry is a constant rate.  A virtual clock says when the link is
    next free, so concurrent responses share the rate instead of each getting it.

    Each piece is sent when the link would have finished carrying it.  The sleeps
    that wait for that overshoot: asyncio's epoll timers round every wait up to a
    whole millisecond, and a busy event loop wakes later still.  The clock
    therefore lets the link fall up to ``slack`` seconds behind schedule and
    catch up (a token bucket ``slack`` seconds deep) instead of restarting from
    "now" after each late wake-up, which lost every overshoot and capped the
    link near one 16 KiB piece per millisecond (~100 Mbit/s) whatever the rate.
    Only a response already under way gets that credit: its first piece starts
    no earlier than now, so a link left idle between requests does not bank
    time and burst it out (which would make a small body, such as a manifest
    the client measures its first throughput on, look instantaneous).
    """

    def __init__(self, schedule: Sequence[tuple[float, float]], slack: float = 0.025):
        if not schedule or any(s <= 0 or r <= 0 for s, r in schedule):
            raise InputError("a throttle needs positive durations and rates")
        if slack < 0:
            raise InputError("a throttle's slack cannot be negative")
        self.schedule = list(schedule)
        self.slack = slack
        self._period = sum(s for s, _ in schedule)
        self._origin = time.monotonic()
        self._free_at = 0.0

    @classmethod
    def constant(cls, mbps: float) -> Throttle:
        return cls([(1.0, mbps)])

    def bytes_per_second(self, at: float) -> float:
        t = (at - self._origin) % self._period
        for seconds, mbps in self.schedule:
            if t < seconds:
                return mbps * 1e6 / 8
            t -= seconds
        return self.schedule[-1][1] * 1e6 / 8

    def piece_bytes(self, at: float | None = None) -> int:
        """How many bytes to send per paced write: about a millisecond of the link's time.

        Pieces far smaller than the timer's resolution cost a wake-up each
        for nothing; far larger ones make the link bursty.
        """
        rate = self.bytes_per_second(time.monotonic() if at is None else at)
        return int(min(MAX_PIECE, max(MIN_PIECE, rate * 0.001)))

    def reserve(self, nbytes: int, now: float, continuing: bool = False) -> float:
        """Book ``nbytes`` on the link at ``now``; returns when they have crossed it.

        ``continuing``: the bytes follow earlier ones of the same response, whose
        sender may have woken up to ``slack`` seconds late.
        """
        start = max(self._free_at, now - self.slack if continuing else now)
        self._free_at = start + nbytes / self.bytes_per_second(start)
        return self._free_at

    async def pace(self, nbytes: int, continuing: bool = False) -> None:
        now = time.monotonic()
        done = self.reserve(nbytes, now, continuing)
        if done > now:
            await asyncio.sleep(done - now)


MIN_PIECE = 16 << 10  # bounds on the throttle's write size (see Throttle.piece_bytes)
MAX_PIECE = 256 << 10


class ThrottleMiddleware:
    """Sends every response body through a :class:`Throttle`, in pieces of about 1 ms of link time."""

    def __init__(self, app: ASGIApp, throttle: Throttle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False  # whether this response has sent body bytes yet

        async def paced_send(message: Message) -> None:
            nonlocal started
            if message["type"] != "http.response.body" or not message.get("body"):
                return await send(message)
            body, more = message["body"], message.get("more_body", False)
            i = 0
            while i < len(body):
                piece = body[i : i + self.throttle.piece_bytes()]
                i += len(piece)
                await self.throttle.pace(len(piece), continuing=started)
                started = True
                await send({"type": message["type"], "body": piece,
                            "more_body": more or i < len(body)})

        await self.app(scope, receive, paced_send)


class GuardMiddleware:
    """Bounds requests before any route sees them, and writes the access log.

    Only GET and HEAD (405); no request body (413); URLs up to
    :data:`MAX_URL_CHARS` (414); headers up to :data:`MAX_HEADER_BYTES` (431).
    h11 caps the size of a head that arrives in pieces (and the server's protocol its
    time, :func:`kvzip.stream.server.bounded_h11_protocol`); this catches those sent at once.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        sent = {"status": 0, "bytes": 0}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        rejection = _reject(scope)
        try:
            if rejection is not None:
                await error_response(*rejection)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                '%s "%s %s" %d %d %.1fms', client[0], scope["method"],
                scope.get("raw_path", b"").decode("latin-1")[:200] or scope["path"][:200],
                sent["status"], sent["bytes"], (time.perf_counter() - started) * 1000,
            )


def _reject(scope: Scope) -> tuple[int, str] | None:
    if scope["method"] not in ("GET", "HEAD"):
        return 405, "read-only server: only GET and HEAD"
    raw_path = scope.get("raw_path") or scope["path"].encode()
    if len(raw_path) + len(scope.get("query_string", b"")) > MAX_URL_CHARS:
        return 414, f"URL longer than {MAX_URL_CHARS} characters"
    if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
        return 431, f"request headers larger than {MAX_HEADER_BYTES} bytes"
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"0")
    if b"transfer-encoding" in headers or length.strip() not in (b"", b"0"):
        return 413, "requests must not carry a body"
    return None
