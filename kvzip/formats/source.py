"""Byte sources: the only way the reader touches a file's bytes.

A source answers ``size()`` and ``get_bytes(offset, length)``; a local file,
bytes in memory and an HTTP range source are interchangeable behind it.
:func:`checked_range` owns the range arithmetic, so every source refuses
out-of-bounds reads the same way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from kvzip.errors import InputError, TruncatedFileError


class ByteSource(Protocol):
    """Random access to a sequence of bytes of known size."""

    def size(self) -> int:
        """Total number of bytes."""
        ...

    def get_bytes(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``, else :class:`TruncatedFileError`."""
        ...


def checked_range(offset: int, length: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of a read of ``length`` bytes at ``offset`` from ``size`` bytes.

    Python ints do not overflow, but the bound is still written as a
    subtraction so it reads the same in any port of this check.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"negative range: offset {offset}, length {length}")
    if offset > size or length > size - offset:
        raise TruncatedFileError(
            f"bytes [{offset}, {offset + length}) run past the end of the data ({size} bytes); "
            "is the file truncated?"
        )
    return offset, offset + length


class BytesSource:
    """A source over bytes already in memory."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self._data = bytes(data)

    def size(self) -> int:
        return len(self._data)

    def get_bytes(self, offset: int, length: int) -> bytes:
        start, end = checked_range(offset, length, len(self._data))
        return self._data[start:end]


class FileSource:
    """A source over a local file, opened once; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115  (closed by close())
        except OSError as exc:
            raise InputError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        self._size = os.fstat(self._file.fileno()).st_size
        self._lock = threading.Lock()  # seek + read must not interleave

    def size(self) -> int:
        return self._size

    def get_bytes(self, offset: int, length: int) -> bytes:
        start, end = checked_range(offset, length, self._size)
        with self._lock:
            self._file.seek(start)
            data = self._file.read(end - start)
        if len(data) != length:
            raise TruncatedFileError(f"{self.path} shrank while it was being read")
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
