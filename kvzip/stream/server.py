"""``kvzip serve-chunks``: a read-only HTTP server for the ``.kvz`` files under one root.

Routes (described in :mod:`kvzip.stream.openapi`, served at ``/openapi.json``):

- ``GET /contexts`` lists the contexts;
- ``GET /contexts/{name}/manifest`` is a context's manifest (:mod:`kvzip.stream.manifest`);
- ``GET /contexts/{name}/chunks/{chunk}/{level}`` is one chunk payload;
- ``GET /profiles/{digest}.kvzprofile`` is a calibration profile a served file
  names (:mod:`kvzip.stream.profiles`), also at ``GET /{dir}/{digest}.kvzprofile``
  beside the files, as a static server would have it;
- ``GET /{name}`` is the whole file, with a single byte range, a strong ETag,
  ``If-None-Match`` and ``If-Range``, exactly what a static server or CDN gives,
  so clients that only need ranges can be pointed at one instead.

Files are opened per request and served from the open descriptor, so a file
replaced by an atomic rename mid-response keeps serving the old bytes under the
old ETag.  Manifests are cached per file identity (inode, mtime, size).

Slow clients are bounded per connection (see :func:`make_server`): a request
head must be complete within ``header_timeout`` seconds of connecting or of the
previous response, and at most ``max_connections`` are open at once.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from kvzip.codecs.profile import PROFILE_SUFFIX
from kvzip.errors import InputError, KvzipError
from kvzip.formats import KvzReader
from kvzip.formats.source import checked_range
from kvzip.stream.manifest import build_manifest, manifest_url
from kvzip.stream.middleware import GuardMiddleware, Throttle, ThrottleMiddleware, error_response
from kvzip.stream.openapi import openapi_spec
from kvzip.stream.paths import PathRejected, check_name, list_contexts, resolve_context, resolve_directory
from kvzip.stream.profiles import ProfileStore, digest_from_file_name
from kvzip.stream.ranges import RangeNotSatisfiableError, RangeSyntaxError, parse_range

BODY_PIECE = 256 << 10  # file bodies are read and sent in pieces this size
MAX_MANIFEST_BYTES = 64 << 20  # the client's cap on JSON bodies
MANIFEST_CACHE = 128  # manifests kept in memory (each is small next to its file)
HEADER_TIMEOUT = 10.0  # seconds a connection has to send a whole request head
MAX_CONNECTIONS = 512  # open connections by default, fewer where the open-file limit is low
FDS_PER_CONNECTION = 2  # its socket and the file its request has open
FD_RESERVE = 64  # descriptors the process needs besides its connections (libraries, listener)

log = logging.getLogger("kvzip.stream")


# ------------------------------------------------------------------------ files
class OpenFile:
    """An open file served by descriptor: a thread-safe ByteSource (``pread``) with its ETag."""

    def __init__(self, path: Path | None = None, *, fd: int | None = None, etag: str | None = None):
        """Open ``path``, or take over the open descriptor ``fd``; ``etag`` replaces the default."""
        if fd is None:
            assert path is not None
            fd = os.open(path, os.O_RDONLY)
        self.fd = fd
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        self._size = st.st_size
        # Strong: any rewrite changes mtime or inode (atomic writes rename a new inode in).
        digest = hashlib.sha256(repr(self.identity).encode()).hexdigest()[:24]
        self.etag = etag or f'"{digest}"'

    def size(self) -> int:
        return self._size

    def get_bytes(self, offset: int, length: int) -> bytes:
        start, end = checked_range(offset, length, self._size)
        data = os.pread(self.fd, end - start, start)
        if len(data) != length:
            raise InputError("file shrank while it was being served")
        return data

    def close(self) -> None:
        os.close(self.fd)


async def _open(path: Path) -> OpenFile:
    return await anyio.to_thread.run_sync(OpenFile, path)


async def _pieces(file: OpenFile, start: int, end: int) -> AsyncIterator[bytes]:
    """The bytes ``[start, end)`` in pieces, read off the event loop; closes the file."""
    try:
        while start < end:
            n = min(BODY_PIECE, end - start)
            yield await anyio.to_thread.run_sync(file.get_bytes, start, n)
            start += n
    finally:
        file.close()


# -------------------------------------------------------------------- responses
def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match's weak comparison: W/ prefixes are ignored, ``*`` matches anything."""
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _file_response(request: Request, file: OpenFile, cache_control: str = "no-cache") -> Response:
    """200, 206, 304, 400 or 416 for a GET/HEAD of the whole file; the caller opened ``file``."""
    size, etag = file.size(), file.etag
    headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": cache_control}
    inm = request.headers.get("if-none-match")
    if inm is not None and _etag_matches(inm, etag):
        file.close()
        return Response(status_code=304, headers=headers)
    ranges = request.headers.getlist("range")
    if_range = request.headers.get("if-range")
    # If-Range compares strongly; a date or another ETag means "send it all".
    if if_range is not None and if_range.strip() != etag:
        ranges = []
    status, start, end = 200, 0, size
    try:
        if len(ranges) > 1:
            raise RangeSyntaxError("more than one Range header")
        if ranges:
            byte_range = parse_range(ranges[0], size)
            status, start, end = 206, byte_range.start, byte_range.end
            headers["content-range"] = byte_range.content_range()
    except RangeSyntaxError as exc:
        file.close()
        return error_response(400, str(exc), headers)
    except RangeNotSatisfiableError as exc:
        file.close()
        return error_response(416, str(exc), {**headers, "content-range": f"bytes */{size}"})
    headers["content-length"] = str(end - start)
    media = "application/octet-stream"
    if request.method == "HEAD":
        file.close()
        return Response(status_code=status, headers=headers, media_type=media)
    return StreamingResponse(_pieces(file, start, end), status, headers, media)


# --------------------------------------------------------------------- contexts
@dataclass(frozen=True)
class Context:
    """What the server knows about one valid ``.kvz``: its manifest, cached per file identity."""

    etag: str
    manifest: dict[str, Any]
    manifest_bytes: bytes


class ContextCache:
    """Manifests by file identity, least recently used first out."""

    def __init__(self, capacity: int = MANIFEST_CACHE,
                 profile_size: Callable[[str], int | None] | None = None):
        self._items: OrderedDict[tuple[int, ...], Context] = OrderedDict()
        self._capacity = capacity
        self._profile_size = profile_size  # for a profile whose size the header leaves out

    def get(self, file: OpenFile, name: str) -> Context:
        """The context of the open ``file``; raises :class:`KvzipError` if it is not a valid .kvz."""
        key = file.identity
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        manifest = build_manifest(KvzReader(file), name, file.etag)
        for profile in manifest["profiles"]:
            if profile["bytes"] is None and self._profile_size is not None:
                profile["bytes"] = self._profile_size(profile["digest"])
        data = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise InputError(f"manifest would be {len(data)} bytes, over {MAX_MANIFEST_BYTES}")
        context = Context(file.etag, manifest, data)
        self._items[key] = context
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return context


class KvzApp:
    """The route handlers; ``root`` must exist and is resolved once."""

    def __init__(self, root: Path, profile_dirs: Sequence[str | os.PathLike[str]] | None = None):
        self.root = root.resolve(strict=True)
        if not self.root.is_dir():
            raise InputError(f"not a directory: {root}")
        self.profiles = ProfileStore(self.root, profile_dirs)
        self.cache = ContextCache(profile_size=self.profiles.size)

    async def _context(self, name: str) -> tuple[OpenFile, Context]:
        file = await _open(resolve_context(self.root, name))
        try:
            context = await anyio.to_thread.run_sync(self.cache.get, file, name)
        except BaseException:
            file.close()
            raise
        return file, context

    async def listing(self, request: Request) -> Response:
        names = await anyio.to_thread.run_sync(lambda: list(list_contexts(self.root)))
        contexts = []
        for name in names:
            entry: dict[str, Any] = {"name": name, "url": "/" + name, "manifest": manifest_url(name)}
            try:
                file, context = await self._context(name)
            except (PathRejected, OSError):
                continue  # removed since the walk
            except KvzipError as exc:
                entry["error"] = str(exc)
            else:
                file.close()
                header = context.manifest["header"]
                entry.update(
                    size=context.manifest["file"]["size"],
                    etag=context.etag,
                    tokens=header["token_count"],
                    levels=[level["name"] for level in header["levels"]],
                    model_fingerprint=context.manifest["model_fingerprint"],
                    profiles=[p["digest"] for p in context.manifest["profiles"]],
                )
            contexts.append(entry)
        return JSONResponse({"contexts": contexts})

    async def manifest(self, request: Request) -> Response:
        file, context = await self._context(request.path_params["name"])
        file.close()
        if_none_match = request.headers.get("if-none-match")
        headers = {"etag": context.etag, "cache-control": "no-cache"}
        if if_none_match is not None and _etag_matches(if_none_match, context.etag):
            return Response(status_code=304, headers=headers)
        return Response(context.manifest_bytes, headers=headers, media_type="application/json")

    async def chunk(self, request: Request) -> Response:
        params = request.path_params
        file, context = await self._context(params["name"])
        try:
            chunks = context.manifest["chunks"]
            number, level = params["chunk"], params["level"]
            if number >= len(chunks) or level not in chunks[number]["levels"]:
                return error_response(404, f"no chunk {number} at level {level!r}")
            where = chunks[number]["levels"][level]
            data = await anyio.to_thread.run_sync(file.get_bytes, where["offset"], where["length"])
        finally:
            file.close()
        headers = {"etag": context.etag, "x-kvzip-crc32": f"{where['crc32']:08x}"}
        return Response(data, headers=headers, media_type="application/octet-stream")

    async def whole_file(self, request: Request) -> Response:
        return await self._whole(request, request.path_params["name"])

    async def profile(self, request: Request) -> Response:
        """``/profiles/<digest>.kvzprofile``; any other name here is a path under the root."""
        return await self._whole(request, "profiles/" + request.path_params["file"])

    async def _whole(self, request: Request, name: str) -> Response:
        if name.endswith(PROFILE_SUFFIX):
            return await self._profile_file(request, name)
        file = await _open(resolve_context(self.root, name))
        return _file_response(request, file)

    async def _profile_file(self, request: Request, name: str) -> Response:
        """A profile at ``<dir>/<digest>.kvzprofile``: served by digest when ``<dir>`` is a
        directory under the root (or ``profiles``) and this server may hand the digest out."""
        segments = check_name(name)
        digest = digest_from_file_name(segments[-1])
        if digest is None:
            raise PathRejected(404, "not found")
        if segments[:-1] != ["profiles"]:
            await anyio.to_thread.run_sync(resolve_directory, self.root, segments[:-1])
        fd = await anyio.to_thread.run_sync(self.profiles.open, digest)
        if fd is None:
            return error_response(404, f"no profile {digest[:12]}… here")
        file = OpenFile(fd=fd, etag=f'"{digest}"')  # content-addressed: the digest is the ETag
        return _file_response(request, file, "public, max-age=31536000, immutable")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_spec())


async def _path_rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PathRejected)
    return error_response(exc.status, str(exc))


async def _invalid_kvz(request: Request, exc: Exception) -> Response:
    return error_response(422, f"not a valid .kvz: {exc}")


async def _unreadable(request: Request, exc: Exception) -> Response:
    return error_response(404, "not found")  # unreadable or vanished: say no more than for missing


# -------------------------------------------------------------------------- app
def create_app(root: str | os.PathLike[str], throttle: Throttle | None = None, *,
               profile_dirs: Sequence[str | os.PathLike[str]] | None = None) -> ASGIApp:
    """The ASGI app serving ``root``; ``throttle`` paces bodies (tests and benchmarks only).

    ``profile_dirs`` are where profiles named by the served files are looked for
    beside the root (default: the profile directories configured now).
    """
    handlers = KvzApp(Path(root), profile_dirs)
    app = Starlette(
        routes=[
            Route("/openapi.json", handlers.openapi, methods=["GET"]),
            Route("/contexts", handlers.listing, methods=["GET"]),
            Route("/contexts/{name:path}/manifest", handlers.manifest, methods=["GET"]),
            Route("/contexts/{name:path}/chunks/{chunk:int}/{level}", handlers.chunk,
                  methods=["GET"]),
            Route("/profiles/{file}", handlers.profile, methods=["GET"]),
            Route("/{name:path}", handlers.whole_file, methods=["GET"]),
        ],
        exception_handlers={
            PathRejected: _path_rejected, KvzipError: _invalid_kvz, OSError: _unreadable,
        },
    )
    inner: ASGIApp = app if throttle is None else ThrottleMiddleware(app, throttle)
    return GuardMiddleware(inner)


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging config plus kvzip's access log, all on stderr."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["kvzip.stream"] = {"handlers": ["default"], "level": level.upper(),
                                         "propagate": False}
    return config


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back from ``getsockname()``).

    The socket is made with an explicit ``IPPROTO_TCP``: asyncio turns Nagle's
    algorithm off (TCP_NODELAY) only on connections whose socket says so, and
    ``socket.create_server`` leaves the protocol 0.  With Nagle on, a response's
    body waited behind its unacknowledged headers for the client's delayed ACK,
    about 40 ms on every request after the first on a kept-alive connection.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
            flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited on Linux
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ slow clients
def _open_file_limits() -> tuple[int | None, int | None]:
    """The soft and hard limits on open files (``ulimit -n``, ``-Hn``); None where unlimited."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to read
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return (None if soft == unlimited else soft), (None if hard == unlimited else hard)


def default_max_connections() -> int:
    """:data:`MAX_CONNECTIONS`, or fewer where the soft open-file limit would run out first."""
    soft, _ = _open_file_limits()
    if soft is None:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, (soft - FD_RESERVE) // FDS_PER_CONNECTION))


def check_limits(header_timeout: float, max_connections: int) -> None:
    """Raise :class:`InputError` unless both bounds are usable numbers."""
    if not 0 < header_timeout < float("inf"):
        raise InputError(f"the header timeout must be a positive number of seconds, got {header_timeout}")
    if max_connections < 1:
        raise InputError(f"at least one connection must be allowed, got {max_connections}")


def reserve_descriptors(max_connections: int) -> None:
    """Make room for ``max_connections`` open at once: raise the soft open-file limit
    toward the hard one if it is too low; :class:`InputError` if even the hard one is."""
    need = max_connections * FDS_PER_CONNECTION + FD_RESERVE
    soft, hard = _open_file_limits()
    if soft is None or need <= soft:
        return
    if hard is not None and need > hard:
        raise InputError(f"{max_connections} connections need about {need} open files, over this "
                         f"process's limit of {hard} (ulimit -Hn)")
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, resource.RLIM_INFINITY if hard is None else hard))
    except (ValueError, OSError) as exc:
        raise InputError(f"{max_connections} connections need about {need} open files; raising the "
                         f"limit of {soft} (ulimit -n) failed: {exc}") from None


class _ClosedLog:
    """Counts the connections closed for being slow or too many; a warning every 10 s at most."""

    EVERY = 10.0

    def __init__(self, header_timeout: float, max_connections: int):
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.slow = self.excess = 0
        self.logged_at = -self.EVERY
        self.pending: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, *, slow: bool) -> None:
        if slow:
            self.slow += 1
        else:
            self.excess += 1
        if self.pending is None:  # else the counts go out with the warning already due
            wait = self.logged_at + self.EVERY - loop.time()
            if wait <= 0:
                self._flush(loop)
            else:
                self.pending = loop.call_later(wait, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pending = None
        log.warning(
            "closed %d connection(s): %d without a whole request head within %gs (--header-timeout), "
            "%d beyond %d open (--max-connections)", self.slow + self.excess, self.slow,
            self.header_timeout, self.excess, self.max_connections)
        self.slow = self.excess = 0
        self.logged_at = loop.time()


def bounded_h11_protocol(header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the two bounds uvicorn has not got: time and number.

    uvicorn's ``timeout_keep_alive`` runs only between requests and is cancelled
    by the first byte of the next one, and nothing at all times a first request,
    so a client sending its head one byte at a time holds a connection (a file
    descriptor) forever; ``limit_concurrency`` answers 503 only once a head is
    complete, and counts the held connections while doing so.  Here:

    - from connecting, and from the end of each response, a connection has
      ``header_timeout`` seconds to deliver a whole request head; then it is
      closed (while a request is being answered the clock is stopped);
    - past ``max_connections`` open, a new connection closes the one that has
      been waiting longest for a request head, or itself if every other one is
      being answered, so the count never grows past the cap and a stalled crowd
      cannot keep a prompt client out.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    closed = _ClosedLog(header_timeout, max_connections)

    class BoundedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_since: float | None = None  # loop time it began waiting for a request head

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                waiting = [c for c in self.connections
                           if c is not self and getattr(c, "_waiting_since", None) is not None]
                closed.note(self.loop, slow=False)
                if not waiting:
                    self._close()
                    return
                min(waiting, key=lambda c: c._waiting_since)._close()
            self._wait_for_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._answering():
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._answering():  # a pipelined request was waiting
                self._stop_waiting()
            else:
                self._wait_for_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _answering(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _wait_for_head(self) -> None:
            self._stop_waiting()
            self._waiting_since = self.loop.time()
            self._deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _stop_waiting(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._waiting_since = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                closed.note(self.loop, slow=True)
                self._close()

        def _close(self) -> None:
            """Close now, and stop counting this connection as open (uvicorn would on connection_lost)."""
            self._stop_waiting()
            self.connections.discard(self)
            if not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol


def make_server(app: ASGIApp, log_level: str | None = "info", *,
                header_timeout: float = HEADER_TIMEOUT, max_connections: int | None = None) -> Any:
    """A uvicorn server for ``app`` with kvzip's bounds; run it with ``server.run(sockets=[...])``.

    ``header_timeout`` and ``max_connections`` (default :func:`default_max_connections`)
    bound slow clients, see :func:`bounded_h11_protocol`.  The protocol is h11
    whatever else is installed: both bounds and the cap on a request head's size
    (``h11_max_incomplete_event_size``) are built on h11's parser, and uvicorn's
    "auto" would switch to httptools, with neither, as soon as it is installed.

    uvicorn installs SIGINT/SIGTERM handlers when run in the main thread and
    then stops accepting, lets open responses finish (up to the grace time) and
    exits.  ``log_level`` None leaves the process's logging alone (embedded use).
    """
    import uvicorn

    if max_connections is None:
        max_connections = default_max_connections()
    check_limits(header_timeout, max_connections)
    config = uvicorn.Config(
        app,
        http=bounded_h11_protocol(header_timeout, max_connections),
        ws="none",  # no websocket routes; an upgraded connection would leave the count
        log_config=None if log_level is None else log_config(log_level),
        log_level=log_level,
        access_log=False,  # kvzip.stream.access logs with sizes and times instead
        # No limit_concurrency: it counts open connections, which the protocol keeps
        # under max_connections, so it could only turn prompt clients away with 503s.
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=16 << 10,  # caps request line + headers
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(
    root: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    throttle: Throttle | None = None,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "info",
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int | None = None,
) -> None:
    """Serve ``root`` until SIGINT or SIGTERM; ``on_ready`` gets the base URL once listening.

    ``header_timeout`` and ``max_connections`` bound slow clients (:func:`make_server`);
    the open-file limit is raised for ``max_connections`` if it has to be and can be.
    """
    if max_connections is None:
        max_connections = default_max_connections()
    check_limits(header_timeout, max_connections)
    reserve_descriptors(max_connections)
    app = create_app(root, throttle)
    server = make_server(app, log_level, header_timeout=header_timeout, max_connections=max_connections)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if on_ready is not None:
        on_ready(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
    server.run(sockets=[sock])


@contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", *, header_timeout: float = HEADER_TIMEOUT,
                    max_connections: int | None = None) -> Iterator[str]:
    """Run ``app`` on a free port of ``host`` in a background thread; yields the base URL.

    For tests and benchmarks: the server is always stopped (and its thread
    joined) when the block ends, however it ends.  The bounds are
    :func:`make_server`'s.
    """
    server = make_server(app, log_level=None, header_timeout=header_timeout,
                         max_connections=max_connections)
    sock = bind(host, 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
