"""Slow clients on ``kvzip serve-chunks``: a slowloris crowd is closed, and a prompt client gets in.

Real servers on loopback with small bounds.  No assertion is on a tight timing:
every wait is for an event (a socket the server closed, a response) under a
deadline of several seconds, so a loaded machine makes the tests slower, not red.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from test_stream_helpers import write_random_context
from typer.testing import CliRunner

from kvzip.cli.app import app as cli
from kvzip.stream.middleware import Throttle
from kvzip.stream.server import create_app, serve_in_thread

HEADER_TIMEOUT = 0.5
CAP = 50
CROWD = 150
DEADLINE = 20.0  # seconds any one wait may take before the test gives up
PARTIAL_HEAD = b"GET /contexts/a.kvz/manifest HTTP/1.1\r\nHo"


@pytest.fixture(scope="module")
def root(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("slowloris")
    write_random_context(tiny_llama, root / "a.kvz", tokens=64, seed=0)
    (root / "big.kvz").write_bytes(bytes(1 << 20))  # the whole-file route does not parse it
    return root


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


@contextmanager
def crowd(base: str, n: int, first: bytes = PARTIAL_HEAD) -> Iterator[dict[socket.socket, float]]:
    """``n`` sockets that sent ``first`` (a head that is never finished); each with when it connected."""
    socks: dict[socket.socket, float] = {}
    try:
        for _ in range(n):
            started = time.monotonic()
            sock = socket.create_connection(address(base), timeout=DEADLINE)
            socks[sock] = started
            if first:
                try:
                    sock.sendall(first)
                except OSError:  # closed already: counted as closed below
                    pass
            sock.setblocking(False)  # from here on only looked at when the selector says so
        yield socks
    finally:
        for sock in socks:
            sock.close()


def is_closed(sock: socket.socket) -> bool | None:
    """True if the server closed ``sock`` (EOF or reset), None if it sent bytes instead."""
    try:
        return True if sock.recv(65536, socket.MSG_DONTWAIT) == b"" else None
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset
        return True


def wait_until_closed(socks, want: int, trickle=()) -> dict[socket.socket, float]:
    """Watch ``socks`` until ``want`` of them were closed by the server (or the deadline);
    returns when each closed one was seen closed.  The open ones of ``trickle`` send one
    more byte of their head every 0.1 s, as a slowloris does."""
    closed: dict[socket.socket, float] = {}
    answered: list[socket.socket] = []
    deadline = time.monotonic() + DEADLINE
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        next_byte = time.monotonic()
        while len(closed) < want and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.05):
                state = is_closed(key.fileobj)
                if state is None:
                    answered.append(key.fileobj)
                if state is not False:
                    closed[key.fileobj] = time.monotonic()
                    selector.unregister(key.fileobj)
            if trickle and time.monotonic() >= next_byte:
                next_byte = time.monotonic() + 0.1
                for sock in trickle:
                    if sock not in closed:
                        try:
                            sock.send(b"s")
                        except OSError:
                            pass  # the server closed it: the selector reports it
    assert not answered, f"the server answered {len(answered)} connection(s) it should have closed"
    return closed


def keep_alive_then_trickle(base: str) -> tuple[socket.socket, float]:
    """A connection that made one whole request, read the answer, then starts a slow second one."""
    started = time.monotonic()  # before the server's clock for the second head starts
    sock = socket.create_connection(address(base), timeout=DEADLINE)
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    sock.sendall(PARTIAL_HEAD)
    sock.setblocking(False)
    return sock, started


def prompt_client_is_served(base: str) -> None:
    """A normal client gets the manifest and a chunk, each within the client's timeout."""
    with httpx.Client(timeout=10) as http:
        manifest = http.get(base + "/contexts/a.kvz/manifest")
        assert manifest.status_code == 200
        chunk = http.get(base + manifest.json()["chunks"][0]["levels"]["lossless"]["url"])
        assert chunk.status_code == 200 and chunk.content


def test_slow_heads_are_closed_after_the_header_timeout(root):
    """Heads sent a byte at a time, not at all, or after a first kept-alive request: all closed."""
    with serve_in_thread(create_app(root), header_timeout=HEADER_TIMEOUT, max_connections=1000) as base:
        kept = [keep_alive_then_trickle(base) for _ in range(10)]
        try:
            with crowd(base, CROWD // 2) as trickling, crowd(base, CROWD // 2, first=b"") as silent:
                prompt_client_is_served(base)
                everyone = {**trickling, **silent, **dict(kept)}
                closed = wait_until_closed(everyone, len(everyone), trickle=[*trickling, *dict(kept)])
                still_open = len(everyone) - len(closed)
                assert still_open == 0, (
                    f"{still_open} of {len(everyone)} slow connections still open {DEADLINE:g} s on")
                # Never before the timeout: the server's clock starts after our connect() did.
                assert min(closed[s] - everyone[s] for s in everyone) >= HEADER_TIMEOUT * 0.9
            prompt_client_is_served(base)
        finally:
            for sock, _ in kept:
                sock.close()


def test_a_crowd_beyond_the_cap_is_closed_and_a_prompt_client_still_gets_in(root):
    """Past ``max_connections`` the longest-waiting heads are closed, not held; newcomers get in."""
    with serve_in_thread(create_app(root), header_timeout=60, max_connections=CAP) as base:
        with crowd(base, CROWD) as socks:
            held = CROWD - len(wait_until_closed(socks, CROWD - CAP))
            assert held <= CAP, f"{held} connections held open, over the cap of {CAP}"
            prompt_client_is_served(base)  # it closes the longest-waiting of the crowd to get in
            time.sleep(0.2)  # anything the server closed in the meantime shows up as readable
            still_open = sum(is_closed(s) is False for s in socks)
            assert CAP // 2 <= still_open <= CAP  # held up to the cap, not all dropped


def test_a_newcomer_is_closed_when_every_connection_is_being_answered(root):
    """With every connection mid-response (a very slow link), the connection over the cap goes."""
    app = create_app(root, Throttle.constant(0.1))  # 1 MiB at 0.1 Mbit/s: busy for over a minute
    with serve_in_thread(app, header_timeout=60, max_connections=3) as base:
        busy = [socket.create_connection(address(base), timeout=DEADLINE) for _ in range(3)]
        try:
            for sock in busy:
                sock.sendall(b"GET /big.kvz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:  # the answer has begun: the request is in progress
                    head += sock.recv(65536)
                assert head.startswith(b"HTTP/1.1 200 ")
            with crowd(base, 1, first=b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n") as newcomer:
                assert len(wait_until_closed(newcomer, 1)) == 1
        finally:
            for sock in busy:
                sock.close()


def assert_one_line_error(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvzip: error:"), result.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_serve_chunks_rejects_unusable_limits(tmp_path):
    root = str(tmp_path)
    assert_one_line_error(["serve-chunks", root, "--header-timeout", "0"], "--header-timeout")
    assert_one_line_error(["serve-chunks", root, "--header-timeout", "nan"], "--header-timeout")
    assert_one_line_error(["serve-chunks", root, "--max-connections", "0"], "--max-connections")
    # Beyond any open-file limit a process can be given (Linux caps it at fs.nr_open).
    assert_one_line_error(["serve-chunks", root, "--max-connections", str(10**9)],
                          "--max-connections", "open files")
    usage = CliRunner().invoke(cli, ["serve-chunks", "--help"]).stdout
    assert "--header-timeout" in usage and "--max-connections" in usage
