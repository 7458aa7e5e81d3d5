"""Codec registry: codec id -> class, and the named quality levels.

Decoding looks a file's codec id up here; an id this build does not know is an
:class:`~kvzip.errors.UnknownCodecError`, never a guess.
"""

from __future__ import annotations

from typing import Any

from kvzip.codecs.base import Codec
from kvzip.errors import CodecError, UnknownCodecError, UnknownLevelError

_REGISTRY: dict[str, type[Codec]] = {}

# Named levels a user picks with --level.  Each is a full codec config: the one
# used when no calibration profile is at hand ("uncalibrated").
LEVELS: dict[str, dict[str, Any]] = {}
# The calibrated codec behind a level, used with a model's profile (the config
# lacks only the profile's digest).
CALIBRATED_LEVELS: dict[str, dict[str, Any]] = {}
DEFAULT_LEVEL = "balanced"


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` decodable by its ``codec_id``."""
    if cls.codec_id in _REGISTRY and _REGISTRY[cls.codec_id] is not cls:
        raise ValueError(f"codec id {cls.codec_id!r} registered twice")
    _REGISTRY[cls.codec_id] = cls
    return cls


def register_level(name: str, config: dict[str, Any], calibrated: dict[str, Any] | None = None) -> None:
    LEVELS[name] = config
    if calibrated is not None:
        CALIBRATED_LEVELS[name] = calibrated


def level_config(name: str, profile: str | None = None) -> dict[str, Any]:
    """The codec config behind a level: calibrated with ``profile`` (a digest) when the
    level has a calibrated form, else the level's uncalibrated config."""
    if name not in LEVELS:
        raise UnknownLevelError(
            f"unknown level {name!r} (choose from: {', '.join(LEVELS)})"
        )
    if profile is not None and name in CALIBRATED_LEVELS:
        return {**CALIBRATED_LEVELS[name], "profile": profile}
    return dict(LEVELS[name])


def codec_ids() -> list[str]:
    return sorted(_REGISTRY)


def codec_from_config(config: Any) -> Codec:
    """Rebuild a codec from the config a file stores."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError("codec config must be an object with a string 'id'")
    cls = _REGISTRY.get(config["id"])
    if cls is None:
        raise UnknownCodecError(
            f"unknown codec {config['id']!r} (this kvzip knows: {', '.join(codec_ids())})"
        )
    params = {k: v for k, v in config.items() if k != "id"}
    return cls.from_params(params)


def codec_for_level(name: str, profile: str | None = None) -> Codec:
    """The codec behind a named quality level (calibrated when ``profile`` is given)."""
    return codec_from_config(level_config(name, profile))
