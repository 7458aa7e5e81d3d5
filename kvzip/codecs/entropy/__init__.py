"""Entropy coding of symbol matrices: one class per bitstream layout.

Each row of a symbol matrix is one *group* (e.g. one (layer, channel) over the chunk's
tokens) with its own categorical model over ``[lo, lo + span)``.  The models travel
inside the block, so a chunk decodes on its own.  The layouts (a codec config's
``entropy`` value; each is specified in docs/format.md, "Entropy layouts"):

``hist``    each row's empirical histogram (:mod:`.hist`); the ``cachegen`` codec.
``param``   a generalised Gaussian per cluster of rows, constriction's range coder
            (:mod:`.param`).
``param2``  the same models laid out for decode speed: symbol pairs, raw low bits,
            constriction's ANS coder (:mod:`.param2`).
``rans``    the same models and side info as ``param``, coded by kvzip's own C rANS
            coder without the GIL (:mod:`.rans`); the current levels' default.

Every layout is :class:`EntropyLayout` (encode(matrix) -> bytes, decode(bytes, shape)
-> int32 matrix, ``releases_gil``, ``name``); what they share (the block frame, the
bounded side info, the parametric model and its clusters) is in :mod:`._common`.
Codecs get a layout from :func:`entropy_layout`.  A new layout is a new name and a new
module beside these, added to ``LAYOUTS`` and to docs/format.md; an old layout's
bitstream never changes, since files in the wild hold it.

Speed: ``hist``, ``param`` and ``param2`` decode with one constriction call per row or
cluster (no per-symbol Python); constriction itself runs at roughly 30-50 M symbols/s
on one core.  ``rans`` decodes a whole chunk in one C call.
"""

from __future__ import annotations

from kvzip.codecs.entropy._common import (
    _GG_F,
    _HEAD,
    _LOG2_GG,
    _POWERS,
    _S_OFFSET,
    _U_LEN,
    BETAS,
    MAX_SPAN,
    EntropyLayout,
    _param_weights,
    _ragged,
    _s_fixed,
    fit_param,
)
from kvzip.codecs.entropy.hist import HistLayout
from kvzip.codecs.entropy.param import ParamLayout
from kvzip.codecs.entropy.param2 import Param2Layout
from kvzip.codecs.entropy.rans import RansLayout
from kvzip.errors import CodecError

LAYOUTS: dict[str, type[EntropyLayout]] = {cls.name: cls for cls in (HistLayout, ParamLayout, Param2Layout, RansLayout)}
FAMILIES = tuple(LAYOUTS)  # the known names, in the order error messages list them


def entropy_layout(name: object) -> EntropyLayout:
    """The layout a codec config names; an unknown name is a CodecError naming the known ones."""
    if not isinstance(name, str) or name not in LAYOUTS:
        raise CodecError(f"unknown entropy layout {name!r}; the known layouts are {', '.join(LAYOUTS)}")
    return LAYOUTS[name]()


def clear_model_caches() -> None:
    """Forget every cached model (benchmarks: decode as a fresh process would)."""
    for cls in LAYOUTS.values():
        cls.clear_caches()


class RangeCoder:
    """The name the layouts had while one class branched over all four:
    ``RangeCoder(name)`` is ``entropy_layout(name)``.  Kept for callers outside
    kvzip's package (fuzz/, tests/test_speed_paths.py); new code calls entropy_layout."""

    _fit_param = staticmethod(fit_param)

    def __new__(cls, family: str = "param") -> EntropyLayout:  # type: ignore[misc]
        return entropy_layout(family)


__all__ = [
    "BETAS", "FAMILIES", "LAYOUTS", "MAX_SPAN", "EntropyLayout", "HistLayout", "Param2Layout", "ParamLayout",
    "RangeCoder", "RansLayout", "clear_model_caches", "entropy_layout",
    # used by tests, fuzz/ and tests/fixtures/make_attacks.py
    "_GG_F", "_HEAD", "_LOG2_GG", "_POWERS", "_S_OFFSET", "_U_LEN", "_param_weights", "_ragged", "_s_fixed",
]
