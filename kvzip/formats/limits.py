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
