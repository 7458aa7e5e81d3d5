"""How much memory decoding may take: the header says what a file needs, the user what it may.

A ``.kvz`` is small on disk and large in memory: within the format's caps
(2**31 elements per chunk, 2**24 tokens) a 33 KB lossless file of zeros honestly
inflates to 1 GiB, and a 130 KB one could ask for 16 GiB.  So before a reader
allocates for a chunk or a level it prices what the header declares and refuses,
with one line naming the setting, anything over the limit.

The limit is ``--max-memory`` on the commands that decode, else the
``KVZIP_MAX_MEMORY`` environment variable (``8G``, ``512MiB``, bytes), else half of
this machine's physical memory.
"""

from __future__ import annotations

import os
import re

from kvzip.errors import InputError, MemoryLimitError

ENV_MAX_MEMORY = "KVZIP_MAX_MEMORY"
DEFAULT_FRACTION = 0.5  # of physical memory, when nobody set a limit
FALLBACK_LIMIT = 8 << 30  # where physical memory cannot be read
# Decoding one chunk holds its float32 output and the codec's intermediates (symbols,
# un-rotated keys, byte planes): measured at about 2x the float32 chunk for the lossless
# codec and the calibrated levels; priced at 3x so the check errs on the safe side.
CHUNK_WORK_FACTOR = 3

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_override: int | None = None


def parse_size(text: str, what: str = "--max-memory") -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5g"`` or plain bytes, as bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise InputError(f"{what}: {text!r} is not a size (e.g. 8G, 512M, 1073741824)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InputError(f"{what} must be positive, got {text!r}")
    return value


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def set_memory_limit(limit: int | None) -> None:
    """Set this process's limit (``None``: back to the environment / machine default)."""
    global _override
    _override = limit


def memory_limit() -> int:
    """The limit in force: :func:`set_memory_limit`, else ``KVZIP_MAX_MEMORY``, else half of RAM."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_MAX_MEMORY)
    if env:
        return parse_size(env, ENV_MAX_MEMORY)
    ram = physical_memory()
    return int(ram * DEFAULT_FRACTION) if ram else FALLBACK_LIMIT


def check_memory(nbytes: int, what: str, limit: int | None = None) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it is over the limit."""
    limit = memory_limit() if limit is None else limit
    if nbytes > limit:
        raise MemoryLimitError(
            f"{what} needs {format_size(nbytes)}, more than the memory limit of "
            f"{format_size(limit)} (raise it with --max-memory or {ENV_MAX_MEMORY})"
        )


def chunk_work_bytes(elements: int) -> int:
    """What decoding one chunk of ``elements`` K/V scalars holds at its peak."""
    return elements * 4 * CHUNK_WORK_FACTOR


def release_free_memory() -> None:
    """Hand memory freed by this process back to the system where the C library keeps it
    (glibc: ``malloc_trim``).  glibc serves blocks below its adaptive mmap threshold (up to
    32 MiB) from heaps it rarely shrinks, so a loop that frees and allocates tens of MiB
    per step (a streamed encode: chunk arrays and the codec's intermediates) grows the
    process by that much per step although nothing is alive; measured on a streamed 2K
    encode at Llama-3-8B geometry, RSS climbed 1.4 GiB where the live data stayed flat.
    A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_LIBC: list = []


def _libc():  # noqa: ANN202 - the C library through ctypes, or None
    if not _LIBC:
        lib = None
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def _malloc_trim():  # noqa: ANN202 - a ctypes function or None
    lib = _libc()
    return None if lib is None else lib.malloc_trim


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """From now on, have glibc map every block of ``threshold`` bytes or more on its own
    and unmap it when freed, instead of raising its mmap threshold (up to 32 MiB) as large
    blocks come and go and keeping them in its heaps.  A model's forward over a long
    context allocates and frees tens of MiB per layer; with the adaptive threshold the
    process grew by up to 0.9 GiB per forward (8K tokens, Llama-3-8B geometry), with this
    by under 0.1 GiB, at about 8% more time spent on page faults.  kvzip does this only
    when memory is what matters (``--prefill-cache disk``); it lasts for the process.  A
    no-op where there is no glibc."""
    lib = _libc()
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, int(threshold))


# A streamed encode codes this much chunk work side by side at most (one chunk at least):
# a few chunks, not a share of the cache.
STREAM_WORK_FRACTION = 1 / 32  # of the memory limit


def stream_threads(chunk_elements: int, threads: int) -> int:
    """How many of ``threads`` may code chunks of ``chunk_elements`` K/V scalars side by
    side in a streamed encode, keeping their work within a small share of the limit."""
    budget = int(memory_limit() * STREAM_WORK_FRACTION)
    return max(1, min(threads, budget // max(1, chunk_work_bytes(chunk_elements))))
