"""The named quality levels: what ``--level NAME`` means, in one table.

Each level is a codec config used when no calibration profile is at hand
("uncalibrated"), and, for the lossy levels, the calibrated codec that the
model's profile turns it into (the config lacks only the profile's digest).
Adding a level is one :func:`register_level` line here (and its measured figures
in ``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvzip.codecs import Codec, codec_from_config
from kvzip.codecs.profile import Profile
from kvzip.errors import InputError, UnknownLevelError

# Level name -> uncalibrated codec config, in quality order (best first).
LEVELS: dict[str, dict[str, Any]] = {}
# Level name -> the calibrated codec behind it, used with a model's profile.
CALIBRATED_LEVELS: dict[str, dict[str, Any]] = {}
DEFAULT_LEVEL = "balanced"


def register_level(name: str, config: dict[str, Any], calibrated: dict[str, Any] | None = None) -> None:
    LEVELS[name] = config
    if calibrated is not None:
        CALIBRATED_LEVELS[name] = calibrated


register_level("lossless", {"id": "bytegroup-zstd", "zstd_level": 3})
# Lossy levels (measured in benchmarks/codec_quality.py; numbers in the codec docs).
_KVZIP_LOSSY_BASE = {
    "id": "kvzip-lossy", "prerope": True, "key_channel_exp": 0.0, "value_token_exp": 0.5,
    "sink_tokens": 4, "sink_factor": 16.0, "early_layers": 0, "early_factor": 1.0, "entropy": "rans",
}
# With a calibration profile for the model (kvzip calibrate), the levels use the
# calibrated codec; ``step`` is relative to the profile's per-layer allocation.
_PROFILE_BASE = {
    "id": "kvzip-profile", "value_token_exp": 0.5, "sink_tokens": 4, "sink_factor": 16.0, "entropy": "rans",
}
register_level("high", {**_KVZIP_LOSSY_BASE, "key_step": 0.12, "value_step": 0.2},
               calibrated={**_PROFILE_BASE, "step": 0.22})
register_level("balanced", {**_KVZIP_LOSSY_BASE, "key_step": 0.27, "value_step": 0.5},
               calibrated={**_PROFILE_BASE, "step": 0.45})
register_level("small", {**_KVZIP_LOSSY_BASE, "key_step": 0.55, "value_step": 1.0},
               calibrated={**_PROFILE_BASE, "step": 1.2})


def check_level(name: str) -> str:
    """``name`` if it is a level, else the one :class:`UnknownLevelError` every caller raises."""
    if name not in LEVELS:
        raise UnknownLevelError(f"unknown level {name!r} (choose from: {', '.join(LEVELS)})")
    return name


def check_levels(names: Iterable[str]) -> list[str]:
    """Level names, each checked and in the order given, once each."""
    names = list(dict.fromkeys(names))
    if not names:
        raise InputError("no level given")
    return [check_level(name) for name in names]


def is_calibrated(name: str) -> bool:
    """Whether the level has a calibrated form (so encoding it wants the model's profile)."""
    return check_level(name) in CALIBRATED_LEVELS


def level_config(name: str, profile: str | None = None) -> dict[str, Any]:
    """The codec config behind a level: calibrated with ``profile`` (a digest) when the
    level has a calibrated form, else the level's uncalibrated config."""
    check_level(name)
    if profile is not None and name in CALIBRATED_LEVELS:
        return {**CALIBRATED_LEVELS[name], "profile": profile}
    return dict(LEVELS[name])


def codec_for_level(name: str, profile: Profile | None = None,
                    importance_factors: Sequence[float] | None = None) -> Codec:
    """The codec behind a named level (calibrated when a ``profile`` is given); with
    ``importance_factors``, its step scaled per entry by importance class."""
    config = level_config(name, None if profile is None else profile.digest)
    if importance_factors is not None:
        if config["id"] not in ("kvzip-lossy", "kvzip-profile"):
            raise InputError(f"level {name!r} codes every entry alike; --importance needs a lossy kvzip level")
        config = {**config, "importance_factors": [float(f) for f in importance_factors]}
    return codec_from_config(config, profile if "profile" in config else None)
