"""Download limits against a real hostile HTTP server on loopback: trickling, stalling, redirecting.

A server that sends one byte at a time must not hold ``fetch`` (or a streamed
``generate``) forever: the minimum speed and the overall deadline end it with a
one-line :class:`FetchError` naming the option to change, and no temporary
file is left.  Redirects are followed within the URL's origin only, unless allowed.

Every call under test runs in a worker thread joined with a generous bound, so
a regression fails the test instead of hanging the suite; the servers are
always shut down, and their handlers stop when told to.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_stream_helpers import write_random_context
from typer.testing import CliRunner

from kvzip.cli.app import app
from kvzip.errors import FetchError, InputError
from kvzip.formats.spec import FIRST_READ_BYTES
from kvzip.stream.client import stream_generate
from kvzip.stream.fetch import fetch
from kvzip.stream.http import DownloadLimits, RetryPolicy, get_json, new_client
from kvzip.stream.ranges import parse_range

FAST = RetryPolicy(attempts=2, base_delay=0.0)
BOUND = 60.0  # seconds any one call may take before the test calls it a hang (they take ~1-3)
TRICKLE_SLEEP = 0.01  # one byte per sleep: at most 100 bytes/s, far under the 1000 asked
SLOW = DownloadLimits(max_seconds=30, min_speed=1000, min_speed_window=0.5)


# ------------------------------------------------------------------ the hostile server
class _Server:
    """A threaded HTTP/1.1 server on 127.0.0.1 serving one .kvz file under several behaviours.

    ``/a.kvz``: honest byte ranges.  ``/trickle.kvz``: honest for the first read
    (the header and index), then each later range one byte at a time.
    ``/stall.kvz``: likewise, but later ranges send their headers and no body.
    ``/slow.json``: a JSON body one byte at a time.  ``/old.kvz``: a 302 to
    ``/a.kvz``; ``/loop.kvz``: a 302 to itself; ``/away.kvz``: a 302 to
    ``redirect_to`` (another origin).  ``log`` holds (path, Range) per request.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.log: list[tuple[str, str | None]] = []
        self.redirect_to = ""
        self.stop = threading.Event()
        self.saw_part: list[bool] = []  # for each hostile range: was a temp file in watch_dir then?
        self.watch_dir: Path | None = None
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle keep-alive connection ends on its own

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                try:
                    owner.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on us, as it should

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path, rng = h.path, h.headers.get("Range")
        self.log.append((path, rng))
        if path in ("/old.kvz", "/loop.kvz", "/away.kvz"):
            to = {"/old.kvz": "/a.kvz", "/loop.kvz": "/loop.kvz", "/away.kvz": self.redirect_to}[path]
            h.send_response(302)
            h.send_header("Location", to)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if path == "/slow.json":
            body = json.dumps({"pad": "x" * 2000}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self.trickle(h, body)
            return
        if path not in ("/a.kvz", "/trickle.kvz", "/stall.kvz") or rng is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        r = parse_range(rng, len(self.data))
        h.send_response(206)
        h.send_header("Content-Range", r.content_range())
        h.send_header("Content-Length", str(r.length))
        h.send_header("ETag", '"v1"')
        h.end_headers()
        body = self.data[r.start:r.end]
        if path == "/a.kvz" or r.start < FIRST_READ_BYTES:
            h.wfile.write(body)
            return
        if self.watch_dir is not None:
            self.saw_part.append(bool(os.listdir(self.watch_dir)))  # only the download's temp file
        if path == "/stall.kvz":
            self.stop.wait(BOUND)
            return
        self.trickle(h, body)

    def trickle(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        for i in range(len(body)):  # bounded by the body, and stopped with the server
            if self.stop.is_set():
                return
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
            time.sleep(TRICKLE_SLEEP)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=15)


@contextmanager
def serving(data: bytes) -> Iterator[_Server]:
    server = _Server(data)
    server.thread.start()
    try:
        yield server
    finally:
        server.close()


def bounded(call: Callable[[], Any], seconds: float = BOUND) -> tuple[Any, BaseException | None, float]:
    """(result, exception, seconds) of ``call()`` run in a thread; a test failure if it hangs."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    took = time.monotonic() - started
    if worker.is_alive():
        pytest.fail(f"still running after {seconds:.0f} s: the download limits did not end it")
    return out.get("result"), out.get("error"), took


def fetch_error(call: Callable[[], Any]) -> str:
    """The message of the FetchError ``call()`` must raise (bounded in time)."""
    _, error, _ = bounded(call)
    assert isinstance(error, FetchError), repr(error)
    message = str(error)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def kvz(tiny_llama, tmp_path_factory) -> Path:
    """A lossless .kvz whose header and index fit the first read, with payloads past it."""
    path = write_random_context(tiny_llama, tmp_path_factory.mktemp("lim") / "a.kvz", 256, seed=3)
    assert path.stat().st_size > 2 * FIRST_READ_BYTES
    return path


@pytest.fixture
def server(kvz) -> Iterator[_Server]:
    with serving(kvz.read_bytes()) as s:
        yield s


@pytest.fixture
def other(kvz) -> Iterator[_Server]:
    """A second server: another origin (another port of 127.0.0.1)."""
    with serving(kvz.read_bytes()) as s:
        yield s


# ------------------------------------------------------------------------- slowness
def test_a_trickling_server_fails_on_the_minimum_speed_and_leaves_no_part(server, tmp_path):
    server.watch_dir = tmp_path
    message = fetch_error(lambda: fetch(server.url + "/trickle.kvz", tmp_path / "x.kvz",
                                        policy=FAST, limits=SLOW))
    assert "slower than the minimum of 1000 bytes/s over 0.5 s" in message
    assert "--min-speed" in message
    assert server.saw_part and server.saw_part[0]  # it failed mid-download, its temp file there...
    assert os.listdir(tmp_path) == []  # ...and gone


@pytest.mark.parametrize("path", ["/trickle.kvz", "/stall.kvz"])
def test_the_overall_deadline_ends_a_slow_or_silent_download(server, tmp_path, path):
    """No minimum speed: the deadline alone ends a body arriving slowly, or not at all
    (no read waits past the deadline, whatever the per-read timeout)."""
    limits = DownloadLimits(max_seconds=2.0, min_speed=0)
    started = time.monotonic()
    message = fetch_error(lambda: fetch(server.url + path, tmp_path / "x.kvz", policy=FAST,
                                        limits=limits))
    assert "took longer than 2 s (--max-download-seconds" in message
    assert time.monotonic() - started < 2.0 + 30  # the client's 30 s read timeout never ran out
    assert os.listdir(tmp_path) == []


def test_json_bodies_obey_the_minimum_speed_too(server):
    with new_client() as client:
        message = fetch_error(lambda: get_json(client, server.url + "/slow.json", FAST, SLOW.start()))
    assert "--min-speed" in message


def test_a_streamed_generate_from_a_trickling_server_fails(server, tiny_llama):
    message = fetch_error(lambda: stream_generate(server.url + "/trickle.kvz", "Q", tiny_llama,
                                                  levels=["lossless"], max_new_tokens=1,
                                                  policy=FAST, limits=SLOW))
    assert "--min-speed" in message


def test_an_honest_server_passes_the_strict_limits(server, kvz, tmp_path):
    _, error, _ = bounded(lambda: fetch(server.url + "/a.kvz", tmp_path / "x.kvz", policy=FAST,
                                        limits=SLOW))
    assert error is None
    assert (tmp_path / "x.kvz").read_bytes() == kvz.read_bytes()


def test_limits_out_of_range_are_input_errors():
    for bad in ({"max_seconds": 0}, {"min_speed": -1}, {"min_speed_window": 0},
                {"max_seconds": float("nan")}):
        with pytest.raises(InputError):
            DownloadLimits(**bad)


# ------------------------------------------------------------------------ redirects
def test_a_redirect_to_another_origin_is_refused_by_default(server, other, tmp_path):
    server.redirect_to = other.url + "/a.kvz"
    message = fetch_error(lambda: fetch(server.url + "/away.kvz", tmp_path / "x.kvz", policy=FAST))
    assert f"redirects (HTTP 302) to {other.url}, another origin than {server.url}" in message
    assert "--allow-redirects-to-other-hosts" in message
    assert other.log == []  # not a single request went there
    assert os.listdir(tmp_path) == []


def test_a_redirect_to_another_origin_is_followed_when_allowed(server, other, kvz, tmp_path):
    server.redirect_to = other.url + "/a.kvz"
    _, error, _ = bounded(lambda: fetch(server.url + "/away.kvz", tmp_path / "x.kvz", policy=FAST,
                                        limits=DownloadLimits(allow_other_hosts=True)))
    assert error is None
    assert (tmp_path / "x.kvz").read_bytes() == kvz.read_bytes()
    assert other.log and all(rng for _, rng in other.log)


def test_a_streamed_generate_refuses_a_redirect_to_another_origin(server, other, tiny_llama):
    server.redirect_to = other.url + "/a.kvz"
    message = fetch_error(lambda: stream_generate(server.url + "/away.kvz", "Q", tiny_llama,
                                                  levels=["lossless"], max_new_tokens=1,
                                                  policy=FAST))
    assert "--allow-redirects-to-other-hosts" in message and other.log == []


def test_same_origin_redirects_are_followed_with_the_same_range(server, kvz, tmp_path):
    _, error, _ = bounded(lambda: fetch(server.url + "/old.kvz", tmp_path / "x.kvz", policy=FAST))
    assert error is None
    assert (tmp_path / "x.kvz").read_bytes() == kvz.read_bytes()
    # each range request was redirected, and asked the target for the very same range
    log = server.log
    assert len(log) >= 4 and len(log) % 2 == 0
    for (asked, first), (went, second) in zip(log[::2], log[1::2]):
        assert (asked, went) == ("/old.kvz", "/a.kvz")
        assert first is not None and first == second


def test_a_redirect_loop_is_a_fetch_error(server, tmp_path):
    message = fetch_error(lambda: fetch(server.url + "/loop.kvz", tmp_path / "x.kvz", policy=FAST))
    assert "more than 5 redirects" in message
    assert len(server.log) == 6  # the request and five redirects, not retried


# ------------------------------------------------------------------------------ CLI
def _cli(*args: str):
    result, error, _ = bounded(lambda: CliRunner().invoke(app, [str(a) for a in args]))
    assert error is None
    return result


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvzip: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_fetch_command_limits_and_redirect_option(server, other, kvz, tmp_path):
    out = tmp_path / "y.kvz"
    slow = _cli("fetch", server.url + "/trickle.kvz", "-o", out, "-q",
                "--min-speed", "1000", "--min-speed-window", "0.5")
    _one_line_error(slow, 5, "--min-speed")
    assert os.listdir(tmp_path) == []
    _one_line_error(_cli("fetch", server.url + "/a.kvz", "-o", out, "-q", "--min-speed", "-1"),
                    2, "--min-speed")
    server.redirect_to = other.url + "/a.kvz"
    _one_line_error(_cli("fetch", server.url + "/away.kvz", "-o", out, "-q"), 5,
                    "--allow-redirects-to-other-hosts")
    allowed = _cli("fetch", server.url + "/away.kvz", "-o", out, "-q",
                   "--allow-redirects-to-other-hosts", "--max-download-seconds", "0")
    assert allowed.exit_code == 0, allowed.output
    assert out.read_bytes() == kvz.read_bytes()


def test_generate_command_download_options(server, other, kvz, tiny_model_dir):
    server.redirect_to = other.url + "/a.kvz"
    refused = _cli("generate", server.url + "/away.kvz", "-p", "Q", "-n", "1",
                   "--model", tiny_model_dir, "-q")
    _one_line_error(refused, 5, "--allow-redirects-to-other-hosts")
    slow = _cli("generate", server.url + "/trickle.kvz", "-p", "Q", "-n", "1", "--level", "lossless",
                "--model", tiny_model_dir, "-q", "--min-speed", "1000", "--min-speed-window", "0.5")
    _one_line_error(slow, 5, "--min-speed")
    local = _cli("generate", kvz, "-p", "Q", "--min-speed", "10")
    _one_line_error(local, 2, "--min-speed applies to a streamed context")
