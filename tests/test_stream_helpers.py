"""Shared helpers of the stream tests (no tests here): tiny contexts and a raw HTTP client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from kvzip.levels import LEVELS, write_kvz

# Lossless plus every lossy level registered, best (largest) first as the controller ranks them.
STREAM_LEVELS = ["lossless"] + [name for name in ("high", "balanced", "small") if name in LEVELS]


def write_context(km, path: Path, text: str, *, chunk_tokens: int = 64, levels=None) -> Path:
    """Prefill ``text`` with the tiny model and store it at ``path`` with every stream level."""
    ids = km.document_ids(text, None)
    kv = km.prefill(ids).dense
    write_kvz(kv, ids, path, km, levels=levels or STREAM_LEVELS, chunk_tokens=chunk_tokens,
              dtype="float32")
    return path


def write_random_context(km, path: Path, tokens: int, seed: int, chunk_tokens: int = 32) -> Path:
    """A lossless context of random KV (no prefill), for tests that only move bytes."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, km.num_layers, km.kv_heads, tokens, km.head_dim, generator=gen)
    ids = torch.randint(0, 256, (tokens,), generator=gen).tolist()
    write_kvz(kv, ids, path, km, levels=["lossless"], chunk_tokens=chunk_tokens, dtype="float32")
    return path


def raw_request(base_url: str, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes as they are (no URL normalisation, unlike httpx) to the server at ``base_url``.

    Returns the status code and the whole response.
    """
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def get(base_url: str, target: str, headers: str = "") -> tuple[int, bytes]:
    """A raw GET of ``target`` (sent verbatim), connection closed after the answer."""
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    return raw_request(base_url, request.encode("latin-1"))


NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


@contextmanager
def nginx_serving(root: Path, workdir: Path, probe: str = "/a.kvz") -> Iterator[str]:
    """nginx (not kvzip) serving ``root`` statically on loopback; yields its base URL."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx-light); the plain "
                    "static-server test needs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read pytest's 0700 dirs
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
{user}
daemon off; master_process off; worker_processes 1; pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.head(url + probe, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    pytest.fail(f"nginx did not start: {proc.stderr.read().decode()[-300:]}")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
