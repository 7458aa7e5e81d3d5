"""The chunk executor: a level's chunks decoded (or encoded) side by side on threads.

Chunks are independent, so they parallelise perfectly when their codec's work
runs outside the GIL (kvzip's rANS coder, numpy, BLAS: ``Codec.releases_gil``):
then ``n`` threads of this process share the chunks, writing straight into one
output array, with no copies, no worker processes and no start-up.

The older entropy layouts (``hist``, ``param``, ``param2``) code through
constriction, which holds the GIL: their chunks run one after another on the
calling thread.  kvzip used to run those on worker processes sharing a
``/dev/shm`` buffer; since every level it writes decodes on threads, that ~300
lines of process plumbing served only old files and the ``cachegen`` reference,
and was removed (docs/architecture.md says what it cost).

``KVZIP_DECODE_WORKERS`` sets the number of threads (1: the calling thread
only); the default is the number of CPUs this process may run on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from kvzip.codecs import Codec, one_blas_thread
from kvzip.errors import InputError

ENV_THREADS = "KVZIP_DECODE_WORKERS"
# Threads cost next to nothing to start, but below this many elements (a few 256-token
# chunks of a 135M model) one thread is already done before a second would help.
MIN_THREAD_ELEMENTS = 1_000_000


def default_threads() -> int:
    """``KVZIP_DECODE_WORKERS`` or the number of CPUs this process may use."""
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InputError(f"{ENV_THREADS} must be an integer, got {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def on_threads(codecs: Sequence[Codec]) -> bool:
    """Whether these codecs gain from threads (all of them release the GIL)."""
    return all(c.releases_gil for c in codecs)


def threads_for(codecs: Sequence[Codec], numel: int, n_chunks: int, requested: int | None) -> int:
    """How many threads should work on ``n_chunks`` chunks of ``numel`` elements in all
    (``requested``: the caller's number, None for the default rule)."""
    if n_chunks < 2 or not on_threads(codecs):
        return 1
    if requested is not None:
        return max(1, min(int(requested), n_chunks))
    if numel < MIN_THREAD_ELEMENTS:
        return 1
    return min(default_threads(), n_chunks)


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

    if n_threads <= 1:
        work(after_own)
    else:
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
