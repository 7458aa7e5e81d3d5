"""Decoding one level's chunks in parallel: threads, or processes sharing one buffer.

A codec whose decode runs outside the GIL (kvzip's rANS coder, numpy, BLAS:
``Codec.releases_gil``) decodes on threads of this process
(:func:`decode_level_threads`).  constriction holds the GIL while it decodes,
so for the older entropy layouts threads cannot share the work; processes can.
The process design, and why:

* The output is a file in ``/dev/shm`` (or the temporary directory when shared
  memory is missing or too small), mapped by the parent and by each worker.
  Workers write their chunks straight into the final ``[2, L, H, T, D]`` array,
  so nothing is copied back; the parent unlinks the name as soon as the call
  ends (the mapping lives on inside the returned array, and nothing is left
  behind whether the call succeeds or fails).
* Workers are plain ``python -c`` subprocesses speaking JSON lines over their
  stdin/stdout, started once and reused across calls.  ``multiprocessing``'s
  spawn and forkserver re-import the caller's ``__main__`` in every worker
  (``python -m kvzip`` would re-run the CLI, a script without a main guard would
  re-run itself, and either may import torch), and fork copies a multi-threaded
  process (torch's thread pools), which can deadlock.  A worker imports only
  ``kvzip.formats`` (numpy, zstandard, constriction).
* Each worker opens the file itself and checks it is the same file (size and
  header/index checksums) before decoding; payload checksums are checked as
  always.  A worker's error comes back as its kvzip error type; a worker that
  dies is a :class:`CodecError`, never a hang (its pipe reaches EOF).
* The calling process decodes chunks too, taking them from the same queue, so
  ``n`` decoders need ``n - 1`` workers, and a cold start overlaps with useful
  work instead of delaying it.  Small levels are decoded in-process only
  (:data:`MIN_PARALLEL_ELEMENTS`).

``KVZIP_DECODE_WORKERS`` sets the number of decoders (1 = in-process only);
the default is the number of CPUs this process may run on.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import mmap
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvzip import errors
from kvzip.atomic import pid_alive
from kvzip.codecs import STORAGE_DTYPES, one_blas_thread
from kvzip.errors import CodecError, FormatError, KvzipError

ENV_WORKERS = "KVZIP_DECODE_WORKERS"
# Below this many decoded elements (about 3 chunks of 256 tokens of a 135M model,
# ~0.1 s of decoding) a level decodes in-process: handing out work costs more.
MIN_PARALLEL_ELEMENTS = 8_000_000
# Threads cost next to nothing to start: two chunks are enough.
MIN_THREAD_ELEMENTS = 1_000_000
BUFFER_PREFIX = "kvzip-decode-"
# Whether the calling process decodes chunks too (tests turn it off to make the
# workers do every chunk).
PARENT_DECODES = True
_SHM_DIR = Path("/dev/shm")


def default_decoders() -> int:
    """How many processes decode a large level: ``KVZIP_DECODE_WORKERS`` or the CPU count."""
    env = os.environ.get(ENV_WORKERS, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise errors.InputError(f"{ENV_WORKERS} must be an integer, got {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def buffer_dir(nbytes: int) -> Path:
    """Where a shared output buffer of ``nbytes`` goes: /dev/shm when it has room."""
    try:
        st = os.statvfs(_SHM_DIR)
        if st.f_bavail * st.f_frsize >= 2 * nbytes:
            return _SHM_DIR
    except (OSError, AttributeError):
        pass
    return Path(tempfile.gettempdir())


def new_buffer_name(directory: Path) -> str:
    """A fresh shared-buffer name in ``directory``, after removing the buffers of this
    host's dead processes (a decode killed with -9 cannot remove its own; in /dev/shm it
    would hold its size of RAM until reboot)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            pid = name[len(BUFFER_PREFIX):].split("-", 1)[0]
            if name.startswith(BUFFER_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(directory / name)
    return str(directory / f"{BUFFER_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")


# ------------------------------------------------------------------ the worker side
def decode_into(reader: Any, level_name: str, chunks: list[int], out: np.ndarray) -> None:
    """Decode chunks (positions in the level's entry list) into their slices of ``out``."""
    entries = reader.kv_entries(level_name)
    for i in chunks:
        entry = entries[i]
        start, end = entry.token_range
        reader.decode_chunk_into(entry, out[:, :, :, start:end])


def file_identity(reader: Any) -> list[int]:
    """What tells two opens of a path apart: size and header/index checksums."""
    return [reader.source.size(), reader.preamble.header_crc, reader.preamble.index_crc]


def _map_output(path: str, shape: tuple[int, ...], dtype: np.dtype,
                write: bool = True) -> tuple[mmap.mmap, np.ndarray]:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    with open(path, "r+b" if write else "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ)
    return mm, np.frombuffer(mm, dtype, int(np.prod(shape))).reshape(shape)


def _handle(request: dict[str, Any]) -> None:
    from kvzip.formats.reader import open_kvz  # the reader imports this module

    with open_kvz(request["path"]) as reader:
        if file_identity(reader) != request["identity"]:
            raise FormatError(f"{request['path']} changed while it was being decoded")
        mm, out = _map_output(request["out"], tuple(request["shape"]), np.dtype(request["dtype"]))
        try:
            decode_into(reader, request["level"], request["chunks"], out)
        finally:
            del out
            try:
                mm.close()
            except BufferError:  # a traceback still holds a view; unmapped once collected
                pass


_ENCODERS: dict[str, Any] = {}  # codec config (JSON text) -> codec, per worker


def _encoder(config: Any) -> Any:
    from kvzip.codecs import codec_from_config

    key = json.dumps(config, sort_keys=True)
    if key not in _ENCODERS:
        _ENCODERS[key] = codec_from_config(config)
    return _ENCODERS[key]


def encode_chunks(array: np.ndarray, codecs: list[Any], chunks: list[list[int]], ctx: dict[str, Any]) -> list[bytes]:
    """Encode ``[start, count]`` token ranges of ``array`` ([2, L, H, T, D]) with every codec:
    the payloads, chunk by chunk and within a chunk level by level."""
    from kvzip.codecs import ChunkContext

    inv = ctx["rope_inv_freq"]
    out = []
    for start, count in chunks:
        piece = np.ascontiguousarray(array[:, :, :, start : start + count, :])
        c = ChunkContext(start, count, ctx["num_layers"], ctx["kv_heads"], ctx["head_dim"], ctx["dtype"],
                         None if inv is None else tuple(inv))
        out.extend(codec.encode(piece, c) for codec in codecs)
    return out


def _handle_encode(request: dict[str, Any]) -> dict[str, Any]:
    # where profiles are found may have changed since this worker started
    env = request.get("env", {})
    for key in [k for k in os.environ if k.startswith("KVZIP_PROFILE") and k not in env]:
        del os.environ[key]
    os.environ.update({k: str(v) for k, v in env.items() if k.startswith("KVZIP_PROFILE")})
    codecs = [_encoder(cfg) for cfg in request["codecs"]]
    mm, array = _map_output(request["in"], tuple(request["shape"]), np.dtype(request["dtype"]), write=False)
    try:
        payloads = encode_chunks(array, codecs, request["chunks"], request["ctx"])
    finally:
        del array
        try:
            mm.close()
        except BufferError:
            pass
    return {"ok": True, "payloads": [base64.b64encode(p).decode("ascii") for p in payloads]}


def serve() -> None:
    """A worker's main loop: one JSON request per line on stdin, one reply per line."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing a library prints may corrupt the replies
    for line in sys.stdin:
        request = None
        try:
            request = json.loads(line)
            if request.get("op") == "encode":
                reply: dict[str, Any] = _handle_encode(request)
            else:
                _handle(request)
                reply = {"ok": True}
        except KvzipError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # a bug or an unexpected failure: still an answer
            what = "encode" if isinstance(request, dict) and request.get("op") == "encode" else "decode"
            reply = {"error": "CodecError", "message": f"{what} worker failed: {type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")


# ------------------------------------------------------------------ the parent side
def _error_from_reply(reply: dict[str, Any]) -> KvzipError:
    cls = getattr(errors, str(reply.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, KvzipError)):
        cls = CodecError
    return cls(str(reply.get("message", "decode worker failed")))


class _Worker:
    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the directory holding kvzip/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env[ENV_WORKERS] = "1"
        # one process per core already: BLAS/OpenMP threads would oversubscribe and spin
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kvzip.formats.parallel import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError, ValueError):
            line = b""
        if not line:
            code = self.proc.poll()
            raise CodecError(f"a decode worker exited unexpectedly (exit status {code})")
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 2.0) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class _Pool:
    """Worker processes kept between calls; one parallel decode at a time."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.busy = threading.Lock()

    def take(self, n: int) -> list[_Worker]:
        self.workers = [w for w in self.workers if w.alive()]
        while len(self.workers) < n:
            self.workers.append(_Worker())
        return self.workers[:n]

    def discard(self, worker: _Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        worker.close(timeout=0.5)

    def shutdown(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def shutdown_workers() -> None:
    """Stop the worker processes (they restart on the next large decode)."""
    with _POOL.busy:
        _POOL.shutdown()


def worker_pids() -> list[int]:
    """Process ids of the live decode workers (for tests and diagnostics)."""
    return [w.proc.pid for w in _POOL.workers if w.alive()]


def want_parallel(reader: Any, numel: int, n_chunks: int, decoders: int | None, threads: bool = False) -> int:
    """How many decoders a level should use (1 = in-process); ``threads``: whether
    they would be threads of this process (a codec that releases the GIL)."""
    n = default_decoders() if decoders is None else max(1, int(decoders))
    if n_chunks < 2 or (not threads and getattr(reader.source, "path", None) is None):
        return 1
    if decoders is None and numel < (MIN_THREAD_ELEMENTS if threads else MIN_PARALLEL_ELEMENTS):
        return 1
    return min(n, n_chunks)


def on_threads(codecs: Sequence[Any]) -> bool:
    """Whether these codecs work in parallel on threads (all release the GIL), so no
    worker process is needed."""
    return all(c.releases_gil for c in codecs)


def decode_level_threads(reader: Any, level_name: str, decoders: int) -> np.ndarray:
    """A whole level decoded by ``decoders`` threads of this process, chunk by chunk,
    straight into one array: for codecs whose decode runs outside the GIL (see
    ``Codec.releases_gil``), this needs no worker processes, no shared file and no
    start-up.  The first failure stops the others and is raised."""
    h = reader.header
    entries = reader.kv_entries(level_name)
    out = np.empty((2, h.num_layers, h.kv_heads, h.token_count, h.head_dim), STORAGE_DTYPES[h.dtype])
    run_on_threads(len(entries), decoders, lambda i: decode_into(reader, level_name, [i], out))
    return out


def run_on_threads(n_tasks: int, n_threads: int, do: Callable[[int], None],
                   after_own: Callable[[], None] | None = None) -> None:
    """``do(i)`` for every task ``i`` in order of hand-out, on ``n_threads`` threads (this
    one included); ``after_own()`` runs on this thread after each task it did itself.
    The first failure stops the hand-out and is raised once every thread stopped.

    BLAS is held to one thread meanwhile, taken by this thread before any other starts
    (see :func:`kvzip.codecs.one_blas_thread`)."""
    pending = list(range(n_tasks - 1, -1, -1))
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work(callback: Callable[[], None] | None) -> None:
        while True:
            with lock:
                if failures or not pending:
                    return
                i = pending.pop()
            try:
                do(i)
                if callback is not None:
                    callback()
            except BaseException as exc:
                with lock:
                    failures.append(exc)
                return

    with one_blas_thread():
        threads = [threading.Thread(target=work, args=(None,), daemon=True) for _ in range(n_threads - 1)]
        for t in threads:
            t.start()
        try:
            work(after_own)
        finally:
            for t in threads:
                t.join()
    if failures:
        raise failures[0]


def decode_level_parallel(reader: Any, level_name: str, decoders: int) -> np.ndarray:
    """A whole level decoded by ``decoders`` processes (this one included)."""
    h = reader.header
    entries = reader.kv_entries(level_name)
    shape = (2, h.num_layers, h.kv_heads, h.token_count, h.head_dim)
    dtype = STORAGE_DTYPES[h.dtype]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    directory = buffer_dir(nbytes)
    name = new_buffer_name(directory)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        out = np.frombuffer(mm, dtype, int(np.prod(shape))).reshape(shape)
        # Small tasks balance the load; each costs a file open (~1 ms) in a worker.
        per_task = max(1, len(entries) // (4 * decoders))
        tasks = [list(range(i, min(i + per_task, len(entries)))) for i in range(0, len(entries), per_task)]
        request = {"path": str(reader.source.path), "identity": file_identity(reader), "level": level_name,
                   "out": name, "shape": list(shape), "dtype": dtype.str}
        _run(tasks, decoders - 1, lambda chunks: {**request, "chunks": chunks}, None,
             lambda chunks: decode_into(reader, level_name, chunks, out))
    finally:
        os.unlink(name)
    return out


def _run(tasks: list[Any], n_workers: int, make_request: Callable[[Any], dict[str, Any]],
         on_reply: Callable[[Any, dict[str, Any]], None] | None, decode_here: Callable[[Any], None]) -> None:
    """Hand tasks to workers and to this process until none is left or one fails.

    A worker gets ``make_request(task)``; its successful reply goes to
    ``on_reply(task, reply)`` (on the worker's feeding thread)."""
    pending = list(reversed(tasks))
    failures: list[BaseException] = []
    lock = threading.Lock()

    def next_task() -> list[int] | None:
        with lock:
            return pending.pop() if pending and not failures else None

    def feed(worker: _Worker) -> None:
        while (chunks := next_task()) is not None:
            try:
                reply = worker.call(make_request(chunks))
            except CodecError as exc:
                _POOL.discard(worker)
                with lock:
                    failures.append(exc)
                return
            if "error" in reply:
                with lock:
                    failures.append(_error_from_reply(reply))
                return
            if on_reply is not None:
                try:
                    on_reply(chunks, reply)
                except Exception as exc:
                    with lock:
                        failures.append(exc if isinstance(exc, KvzipError)
                                        else CodecError(f"bad reply from a worker: {type(exc).__name__}: {exc}"))
                    return

    held = n_workers > 0 and _POOL.busy.acquire(blocking=False)  # else another thread has them
    threads = []
    try:
        if held:
            try:
                workers = _POOL.take(n_workers)
            except OSError:  # cannot start processes here: decode in-process
                workers = []
            threads = [threading.Thread(target=feed, args=(w,), daemon=True) for w in workers]
            for t in threads:
                t.start()
        while (PARENT_DECODES or not threads) and (chunks := next_task()) is not None:
            try:
                decode_here(chunks)
            except BaseException as exc:
                with lock:
                    failures.append(exc)
                if not isinstance(exc, KvzipError):
                    raise
    finally:
        for t in threads:  # workers finish the task in hand, then stop
            t.join()
        if held:
            _POOL.busy.release()
    if failures:
        raise failures[0]


# ------------------------------------------------------------------ parallel encode
def encode_chunks_parallel(array: np.ndarray, codecs: list[Any], chunks: list[tuple[int, int]],
                           ctx: dict[str, Any], encoders: int,
                           done: Callable[[int], None] | None = None) -> list[list[bytes]]:
    """Every chunk (``(start, count)`` token ranges of ``array``, [2, L, H, T, D]) encoded with
    every codec by ``encoders`` encoders, this one included: ``payloads[chunk][level]``.

    When every codec releases the GIL the encoders are threads of this process,
    working on the array itself.  Otherwise they are worker processes: the array is
    copied once into a shared file that workers map read-only;
    workers rebuild each codec from its config, and a codec's output depends only
    on its config and the chunk, so the payloads are the bytes one process would
    write.  ``done(n)`` is called on this thread with the number of chunks finished
    so far.  Errors surface as in :func:`decode_level_parallel`."""
    results: list[list[bytes] | None] = [None] * len(chunks)
    finished = [0]
    lock = threading.Lock()

    def encode_here(task: list[int]) -> None:
        payloads = encode_chunks(array, codecs, [list(chunks[i]) for i in task], ctx)
        store(task, payloads)

    def store(task: list[int], payloads: list[Any]) -> None:
        nl = len(codecs)
        if len(payloads) != nl * len(task):
            raise CodecError("an encode worker returned the wrong number of payloads")
        with lock:
            for j, i in enumerate(task):
                results[i] = list(payloads[j * nl : (j + 1) * nl])
            finished[0] += len(task)

    def here(task: list[int]) -> None:
        encode_here(task)
        if done is not None:
            done(finished[0])

    if encoders <= 1 or len(chunks) < 2 or array.nbytes == 0:
        for i in range(len(chunks)):
            here([i])
        return results  # type: ignore[return-value]
    if on_threads(codecs):  # threads: no copies, no workers
        run_on_threads(len(chunks), min(encoders, len(chunks)), lambda i: encode_here([i]),
                       None if done is None else lambda: done(finished[0]))
        if done is not None:
            done(finished[0])
        return results  # type: ignore[return-value]
    array = np.ascontiguousarray(array)
    directory = buffer_dir(array.nbytes)
    name = new_buffer_name(directory)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.ftruncate(fd, array.nbytes)
            with mmap.mmap(fd, array.nbytes) as mm:
                np.frombuffer(mm, array.dtype, array.size)[:] = array.reshape(-1)
                mm.flush()
        finally:
            os.close(fd)
        request = {"op": "encode", "in": name, "shape": list(array.shape), "dtype": array.dtype.str,
                   "codecs": [c.config() for c in codecs], "ctx": ctx,
                   "env": {k: v for k, v in os.environ.items() if k.startswith("KVZIP_PROFILE")}}
        # one chunk per task: a chunk takes ~0.1 s, far more than handing it out
        tasks = [[i] for i in range(len(chunks))]
        _run(tasks, min(encoders, len(chunks)) - 1,
             lambda task: {**request, "chunks": [list(chunks[i]) for i in task]},
             lambda task, reply: store(task, [base64.b64decode(p) for p in reply["payloads"]]),
             here)
    finally:
        os.unlink(name)
    if any(r is None for r in results):
        raise CodecError("a chunk was not encoded")
    if done is not None:
        done(finished[0])  # the last chunks may have finished in workers
    return results  # type: ignore[return-value]
