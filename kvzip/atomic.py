"""Atomic writes, and the temporary files they leave when a process dies.

Every file kvzip writes (a ``.kvz``, its spill, a download, a profile, a decoded
safetensors, a plot) is written under a temporary name in the target's own
directory, fsynced, renamed onto the target, and the directory fsynced, so a
reader sees the old file or the whole new one, never half of one.

Temporary names are recognisable, so no one else's file is ever touched::

    .<target name>.<host tag>-<pid>-<random>.<kind>.kvzip-tmp

A process that exits through an exception removes its own (the writers'
``finally`` blocks); SIGTERM and SIGHUP are turned into an exception by
:func:`install_signal_handlers` so that they do too.  ``kill -9`` cannot be
caught: its leftovers are removed by the next writer into that directory, or by
``kvzip clean DIR``, once they are stale: written by a process of this host that
is no longer alive, or not modified for :data:`STALE_AFTER` seconds (a live
writer touches its file with every piece, and every kvzip download has a
deadline, so no live process leaves one that long).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvzip.errors import InputError, Terminated

SUFFIX = ".kvzip-tmp"
STALE_AFTER = 24 * 3600.0  # seconds without a write
_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}\."
                   r"(?P<kind>[a-z]+)" + re.escape(SUFFIX) + "$")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows only

_live: set[Path] = set()  # this process's temporary files, removed on SIGTERM/SIGHUP
_live_lock = threading.Lock()


def host_tag() -> str:
    """Eight hex digits naming this host, so a pid is only judged on the host that owns it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(target: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A fresh temporary name beside ``target`` (``kind``: tmp, spill, part...)."""
    target = Path(target)
    name = f".{target.name}.{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}{SUFFIX}"
    return target.parent / name


def create_temp(target: str | os.PathLike[str], kind: str = "tmp", mode: int = 0o666) -> tuple[int, Path]:
    """Create a temporary file beside ``target`` (``O_EXCL``; ``mode`` honours the umask,
    so the renamed file gets the permissions any new file would).  It is registered for
    removal on SIGTERM until :func:`forget` or :func:`discard`."""
    directory = Path(target).parent
    if not directory.is_dir():
        raise InputError(f"output directory does not exist: {directory}")
    sweep_stale(directory)
    path = temp_path(target, kind)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_BINARY, mode)
    except OSError as exc:
        raise InputError(f"cannot write next to {target}: {exc.strerror or exc}") from None
    with _live_lock:
        _live.add(path)
    return fd, path


def forget(path: Path) -> None:
    with _live_lock:
        _live.discard(path)


def discard(path: Path) -> None:
    """Remove a temporary file (if it is still there) and forget it."""
    forget(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def commit(tmp: Path, target: str | os.PathLike[str]) -> None:
    """fsync ``tmp``, rename it onto ``target`` and make the rename durable."""
    target = Path(target)
    fd = os.open(tmp, os.O_RDONLY | _O_BINARY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    forget(tmp)
    fsync_directory(target.parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename durable (POSIX; platforms that cannot open a directory skip it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], kind: str = "tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on a clean exit it replaces
    ``target`` atomically, on any exception it is removed and ``target`` is untouched."""
    fd, tmp = create_temp(target, kind)
    os.close(fd)
    try:
        yield tmp
        commit(tmp, target)
    except BaseException:
        discard(tmp)
        raise


def write_atomic(target: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then :func:`commit`; for writers that take a path (safetensors, savefig)."""
    with atomic_output(target) as tmp:
        write(tmp)


# ------------------------------------------------------------------ leftovers
@dataclass(frozen=True)
class TempFile:
    path: Path
    target: str
    kind: str
    host: str
    pid: int


def parse_temp_name(path: str | os.PathLike[str]) -> TempFile | None:
    """The parts of one of kvzip's temporary names, or None for any other file."""
    path = Path(path)
    match = _NAME.match(path.name)
    if match is None:
        return None
    return TempFile(path, match["target"], match["kind"], match["host"], int(match["pid"]))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def is_stale(temp: TempFile, now: float | None = None, stale_after: float = STALE_AFTER) -> bool:
    if temp.host == host_tag() and temp.pid != os.getpid() and not pid_alive(temp.pid):
        return True
    try:
        age = (time.time() if now is None else now) - temp.path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > stale_after


def stale_temp_files(directory: str | os.PathLike[str]) -> list[TempFile]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = (parse_temp_name(Path(directory) / name) for name in names if name.endswith(SUFFIX))
    return sorted((t for t in found if t is not None and is_stale(t)), key=lambda t: t.path.name)


def sweep_stale(directory: str | os.PathLike[str], dry_run: bool = False) -> list[TempFile]:
    """Remove kvzip's stale temporary files in ``directory``; the ones found."""
    stale = stale_temp_files(directory)
    if not dry_run:
        for temp in stale:
            with contextlib.suppress(OSError):
                temp.path.unlink()
    return stale


# ------------------------------------------------------------------ signals
def _on_signal(signum: int, frame: object) -> None:
    with _live_lock:
        live = list(_live)
    for path in live:  # in case the exception below meets a blocked finally
        with contextlib.suppress(OSError):
            path.unlink()
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`~kvzip.errors.Terminated` in the main thread, so
    writers' cleanup runs; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _on_signal)
