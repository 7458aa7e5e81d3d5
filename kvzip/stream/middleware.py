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
    """

    def __init__(self, schedule: Sequence[tuple[float, float]]):
        if not schedule or any(s <= 0 or r <= 0 for s, r in schedule):
            raise InputError("a throttle needs positive durations and rates")
        self.schedule = list(schedule)
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

    async def pace(self, nbytes: int) -> None:
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.bytes_per_second(start)
        if self._free_at > now:
            await asyncio.sleep(self._free_at - now)


class ThrottleMiddleware:
    """Sends every response body through a :class:`Throttle`, in pieces of ``piece`` bytes."""

    def __init__(self, app: ASGIApp, throttle: Throttle, piece: int = 16 << 10):
        self.app, self.throttle, self.piece = app, throttle, piece

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def paced_send(message: Message) -> None:
            if message["type"] != "http.response.body" or not message.get("body"):
                return await send(message)
            body, more = message["body"], message.get("more_body", False)
            for i in range(0, len(body), self.piece):
                await self.throttle.pace(len(body[i : i + self.piece]))
                last = i + self.piece >= len(body)
                await send({"type": message["type"], "body": body[i : i + self.piece],
                            "more_body": more or not last})

        await self.app(scope, receive, paced_send)


class GuardMiddleware:
    """Bounds requests before any route sees them, and writes the access log.

    Only GET and HEAD (405); no request body (413); URLs up to
    :data:`MAX_URL_CHARS` (414); headers up to :data:`MAX_HEADER_BYTES` (431).
    uvicorn bounds headers that arrive slowly; this catches those sent at once.
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
