"""HTTP byte ranges, both ways: the one place that does range arithmetic for kvzip's HTTP.

The server parses ``Range`` request headers and writes ``Content-Range``; the
client writes ``Range`` and checks the server's ``Content-Range``.  Everything
here is pure (strings and ints in, values or typed errors out), so the hostile
inputs are tested without a network, and the HTTP handler only maps
:class:`RangeSyntaxError` to 400 and :class:`RangeNotSatisfiableError` to 416.

kvzip serves a single range per request (RFC 9110 §14.2 lets a server refuse
multipart ranges); a client never needs more, since each payload is one range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "bytes=" and two 20-digit numbers fit well within this; longer headers are hostile.
MAX_RANGE_HEADER = 100
_DIGITS = r"[0-9]{1,20}"  # 20 digits hold any u64; more is an attack, not a file offset
_RANGE = re.compile(rf"bytes=({_DIGITS})?-({_DIGITS})?")
_CONTENT_RANGE = re.compile(rf"bytes ({_DIGITS})-({_DIGITS})/({_DIGITS}|\*)")


class RangeSyntaxError(ValueError):
    """A ``Range`` header that is malformed, multipart or oversized (HTTP 400)."""


class RangeNotSatisfiableError(ValueError):
    """A well-formed range that selects no byte of the resource (HTTP 416)."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a resource of ``total`` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self) -> str:
        """The ``Content-Range`` value of a 206 carrying this range."""
        return f"bytes {self.start}-{self.end - 1}/{self.total}"


def parse_range(header: str, size: int) -> ByteRange:
    """The single byte range a ``Range`` header selects from ``size`` bytes.

    Accepts ``bytes=a-b``, ``bytes=a-`` and the suffix form ``bytes=-n``; a last
    position past the end is clamped (RFC 9110 §14.1.1).  Several ranges,
    other units or junk raise :class:`RangeSyntaxError`; a first position at or
    past the end, or a zero suffix, raises :class:`RangeNotSatisfiableError`.
    """
    if len(header) > MAX_RANGE_HEADER:
        raise RangeSyntaxError(f"Range header longer than {MAX_RANGE_HEADER} characters")
    spec = header.strip()
    if "," in spec:
        raise RangeSyntaxError("multiple ranges are not supported; ask for one range")
    match = _RANGE.fullmatch(spec)
    if match is None:
        raise RangeSyntaxError(f"malformed Range header {header[:40]!r}; expected bytes=FIRST-LAST")
    first, last = match.groups()
    if first is None and last is None:
        raise RangeSyntaxError("Range header bytes=- names no byte")
    if first is None:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiableError(f"suffix range of {n} bytes selects nothing of {size}")
        return ByteRange(max(0, size - n), size, size)
    start = int(first)
    if last is not None and int(last) < start:
        raise RangeSyntaxError(f"Range header has last byte {last} before first byte {first}")
    if start >= size:
        raise RangeNotSatisfiableError(f"range starts at byte {start}, the resource has {size}")
    end = size if last is None else min(int(last) + 1, size)
    return ByteRange(start, end, size)


def range_header(offset: int, length: int) -> str:
    """The ``Range`` request header for ``length`` bytes at ``offset`` (``length`` > 0)."""
    if offset < 0 or length <= 0:
        raise ValueError(f"bad range: offset {offset}, length {length}")
    return f"bytes={offset}-{offset + length - 1}"


def parse_content_range(value: str) -> ByteRange | None:
    """A 206's ``Content-Range`` as a :class:`ByteRange`; None when it is malformed.

    A total of ``*`` (unknown size) is refused too: a ``.kvz`` reader must know
    the file's size.
    """
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None or match.group(3) == "*":
        return None
    first, last, total = (int(g) for g in match.groups())
    if last < first or last >= total:
        return None
    return ByteRange(first, last + 1, total)
