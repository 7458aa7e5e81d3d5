"""What the most expensive side info an entropy block may declare costs to decode.

Builds, for each clustered layout, side info for a 1,000 x 2,000 block whose clusters all
take the widest window (65,536 values) up to the block's budget
(``kvzip.codecs.entropy._common.span_budget``: its elements plus 2**21), and times the
decoder until it finds the (empty) code words do not match: the weighing of every window
value it must do first is the whole cost.  One budget over is refused before any work
(``tests/test_entropy_fast.py``).

    python benchmarks/side_info_budget.py
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvzip.codecs.entropy import MAX_SPAN, entropy_layout  # noqa: E402
from kvzip.codecs.entropy._common import span_budget  # noqa: E402


def side_info(layout: str, g: int, nc: int) -> bytes:
    cid = np.arange(g) % nc  # every cluster used
    side = b"".join([
        struct.pack("<I", nc), np.zeros(g, "<i4").tobytes(), cid.astype("<u2").tobytes(),
        np.zeros(3 * nc, np.uint8).tobytes(), np.full(nc, -(MAX_SPAN // 2), "<i4").tobytes(),
        np.full(nc, MAX_SPAN, "<i4").tobytes(),
    ])
    return side + (bytes(nc) + bytes([1]) * nc if layout == "param2" else b"")


def main() -> None:
    g, n = 1000, 2000
    nc = span_budget(g, n) // MAX_SPAN
    for layout in ("rans", "param2", "param"):
        coder = entropy_layout(layout)
        words = np.zeros(4, getattr(coder, "word", np.uint32))
        t0 = time.perf_counter()
        try:
            coder._decode(side_info(layout, g, nc), words, np.zeros(0, np.uint8), g, n)
        except Exception as exc:  # the empty stream, after the tables  # noqa: BLE001
            why = type(exc).__name__
        print(f"{layout:<7} {nc} clusters, {nc * MAX_SPAN:,} window values for {g * n:,} elements: "
              f"{time.perf_counter() - t0:.2f} s ({why})")


if __name__ == "__main__":
    main()
