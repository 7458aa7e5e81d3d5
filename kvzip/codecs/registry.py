"""Codec registry: codec id -> class.

Decoding looks a file's codec id up here; an id this build does not know is an
:class:`~kvzip.errors.UnknownCodecError`, never a guess.  A codec is built from
its config alone, plus the calibration profile object when its class says it
needs one (``needs_profile``): no codec reads the disk or the environment.
The named quality levels are :mod:`kvzip.levels.table`.
"""

from __future__ import annotations

from typing import Any

from kvzip.codecs.base import Codec
from kvzip.codecs.profile import Profile
from kvzip.errors import CodecError, ProfileMismatchError, UnknownCodecError

_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` decodable by its ``codec_id``."""
    if cls.codec_id in _REGISTRY and _REGISTRY[cls.codec_id] is not cls:
        raise ValueError(f"codec id {cls.codec_id!r} registered twice")
    _REGISTRY[cls.codec_id] = cls
    return cls


def codec_ids() -> list[str]:
    return sorted(_REGISTRY)


def codec_from_config(config: Any, profile: Profile | None = None) -> Codec:
    """Rebuild a codec from the config a file stores; a codec that needs a calibration
    profile is handed ``profile``, which must be the one its config names."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError("codec config must be an object with a string 'id'")
    cls = _REGISTRY.get(config["id"])
    if cls is None:
        raise UnknownCodecError(
            f"unknown codec {config['id']!r} (this kvzip knows: {', '.join(codec_ids())})"
        )
    params = {k: v for k, v in config.items() if k != "id"}
    if cls.needs_profile:
        digest = params.get("profile")
        if profile is None:
            raise CodecError(f"codec {cls.codec_id!r} needs its calibration profile "
                             f"{str(digest)[:12]}…, and none was given")
        if profile.digest != digest:
            raise ProfileMismatchError(f"codec {cls.codec_id!r} names profile {str(digest)[:12]}…, "
                                       f"not the {profile.digest[:12]}… it was given")
        params["profile"] = profile
    return cls.from_params(params)
