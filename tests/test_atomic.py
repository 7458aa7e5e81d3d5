"""Atomic writes and their leftovers: recognisable temporary names, cleanup on SIGTERM,
and the stale files of a process killed with -9 removed by the next writer or
``kvzip clean``, while a live writer's files are left alone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_cli import run

from kvzip import atomic
from kvzip.formats import KvzWriter
from kvzip.formats.spec import FIRST_READ_BYTES
from kvzip.stream.server import create_app, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
HEADER = {
    "model": {"fingerprint": "sha256:test", "name": "test-model"},
    "num_layers": 1, "kv_heads": 1, "head_dim": 2, "dtype": "float32", "token_count": 1,
    "chunk_tokens": 1, "levels": [{"name": "lossless", "codec": {"id": "bytegroup-zstd"}}],
    "rope": None,
}


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(atomic.SUFFIX))


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_temporary_names_are_recognisable(tmp_path):
    path = atomic.temp_path(tmp_path / "doc.kvz", "spill")
    parsed = atomic.parse_temp_name(path)
    assert parsed is not None and path.parent == tmp_path
    assert (parsed.target, parsed.kind, parsed.pid, parsed.host) == (
        "doc.kvz", "spill", os.getpid(), atomic.host_tag())
    for other in (".doc.kvz.abc.tmp", "doc.kvz", ".doc.kvz.1234.spill", "x.kvzip-tmp"):
        assert atomic.parse_temp_name(tmp_path / other) is None


def test_a_failed_write_leaves_nothing_and_the_target_untouched(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []
    atomic.write_atomic(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and temp_files(tmp_path) == []


def test_kill_9_leftovers_are_swept_by_the_next_writer(tmp_path):
    """A process killed with -9 while writing a .kvz leaves its spill; the next writer
    into that directory removes it (its pid is dead), and `kvzip clean` would too."""
    done = python(f"""
        import os, signal
        from kvzip.formats import KvzWriter
        w = KvzWriter({str(tmp_path / 'doc.kvz')!r}, {HEADER!r})
        w.add_kv(0, 0, 0, 1, b"x" * 4096)
        w._spill.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert done.returncode == -signal.SIGKILL
    left = temp_files(tmp_path)
    assert len(left) == 1 and ".spill" in left[0]
    assert [t.path.name for t in atomic.sweep_stale(tmp_path, dry_run=True)] == left
    with KvzWriter(tmp_path / "other.kvz", HEADER):
        assert temp_files(tmp_path) != left  # the dead one is gone, the live one is ours
    assert temp_files(tmp_path) == []


def test_a_live_writers_files_are_never_swept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".doc.kvz.{atomic.host_tag()}-{child.pid}-0badf00d.spill{atomic.SUFFIX}"
        theirs.write_bytes(b"busy")
        other_host = tmp_path / f".doc.kvz.00000000-1-0badf00d.part{atomic.SUFFIX}"
        other_host.write_bytes(b"fresh")
        unrelated = tmp_path / ".doc.kvz.1234.spill"
        unrelated.write_bytes(b"not ours")
        assert atomic.sweep_stale(tmp_path) == []
        # another host's file is judged by its age alone
        old = time.time() - atomic.STALE_AFTER - 60
        os.utime(other_host, (old, old))
        assert [t.path for t in atomic.sweep_stale(tmp_path)] == [other_host]
        assert theirs.exists() and unrelated.exists() and not other_host.exists()
    finally:
        child.kill()
        child.wait()
    assert [t.path for t in atomic.sweep_stale(tmp_path)] == [theirs]


def test_kvzip_clean_lists_and_removes(tmp_path):
    dead = tmp_path / f".x.kvz.{atomic.host_tag()}-{2**22 + 17}-0badf00d.tmp{atomic.SUFFIX}"
    dead.write_bytes(b"left over")
    assert not atomic.pid_alive(2**22 + 17)  # above Linux's pid_max
    result = run("clean", tmp_path, "--dry-run")
    assert result.exit_code == 0 and "would remove" in result.stdout and dead.exists()
    result = run("clean", tmp_path)
    assert result.exit_code == 0 and "removed" in result.stdout and not dead.exists()
    result = run("clean", tmp_path / "missing")
    assert result.exit_code == 2 and "not a directory" in result.stderr


class StallPastTheHead:
    """Serves what a reader reads first (header and index), then holds every range past
    it until released: a download that is under way for as long as the test wants."""

    def __init__(self, app):
        self.app, self.release = app, threading.Event()

    async def __call__(self, scope, receive, send):
        ranges = [v.decode() for k, v in scope.get("headers", []) if k == b"range"]
        start = ranges[0].removeprefix("bytes=").split("-")[0] if ranges else "0"
        if scope["type"] == "http" and start.isdigit() and int(start) >= FIRST_READ_BYTES:
            while not self.release.is_set():
                await asyncio.sleep(0.05)
        await self.app(scope, receive, send)


def test_sigterm_during_fetch_leaves_no_part_file(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with KvzWriter(served / "doc.kvz", HEADER) as writer:  # larger than the first read
        writer.set_token_ids([0])
        writer.add_kv(0, 0, 0, 1, os.urandom(2 * FIRST_READ_BYTES))
        writer.commit()
    out = tmp_path / "out"
    out.mkdir()
    app = StallPastTheHead(create_app(served))
    with serve_in_thread(app) as url:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "kvzip", "fetch", f"{url}/doc.kvz",
                                 "-o", str(out / "doc.kvz")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not temp_files(out):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.05)
            assert ".part" in temp_files(out)[0]
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            app.release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "kvzip: error: terminated by SIGTERM"
    assert list(out.iterdir()) == []
