"""From level names to codecs: the one ``resolve`` every encoder goes through.

The lossy levels want the model's calibration profile.  ``resolve`` finds it
(``--profile`` as a file or a digest, else the newest one for the model in the
profile directories) and, when the model has none, does what ``if_missing``
says: ``"calibrate"`` builds one once and stores it, ``"uncalibrated"`` uses the
levels' uncalibrated codecs, ``"error"`` refuses.  ``api.encode``, ``kvzip
bench``, ``kvzip precache`` and the library face all call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvzip.codecs import Codec
from kvzip.codecs.profile import Profile, profile_to_bytes
from kvzip.errors import InputError, ProfileNotFoundError
from kvzip.levels.profiles import (
    find_profile,
    is_digest,
    list_profiles,
    profile_dirs,
    register_profile_file,
    write_profile,
)
from kvzip.levels.progress import Progress
from kvzip.levels.table import check_levels, codec_for_level, is_calibrated

if TYPE_CHECKING:
    from kvzip.model import KVModel

IF_NO_PROFILE = ("calibrate", "uncalibrated", "error")

# The scorer the uncalibrated lossy levels spend their bits by.  A profile decides for its
# model from a measurement (``kvzip calibrate``'s quality check); without one there is
# nothing to measure by, so the uncalibrated codec takes what was better on every model
# measured: the attention each entry received during the prefill (no extra pass) halved
# Gemma 3 270M's uncalibrated KL and lowered SmolLM2's, at about the same size
# (docs/architecture.md, "Decisions").
UNCALIBRATED_IMPORTANCE = "prefill"


def level_importance(profile: Profile | None) -> str | None:
    """The scorer the lossy levels coded with ``profile`` (None: uncalibrated) spend their
    bits by when the encoder is not told, or None: uniform precision."""
    return UNCALIBRATED_IMPORTANCE if profile is None else profile.importance


@dataclass(frozen=True)
class Resolved:
    """Levels ready to encode: their names, their codecs, and the profile they use."""

    names: tuple[str, ...]
    codecs: tuple[Codec, ...]
    profile: Profile | None

    def pairs(self) -> list[tuple[str, Codec]]:
        return list(zip(self.names, self.codecs))

    @property
    def importance(self) -> str | None:
        """The scorer the lossy levels spend their bits by when the encoder is not told (the
        profile's, from its calibration's quality check; without a profile
        :data:`UNCALIBRATED_IMPORTANCE`), or None: uniform precision."""
        if not any(is_calibrated(name) for name in self.names):
            return None
        return level_importance(self.profile)


def check_if_missing(if_missing: str) -> str:
    if if_missing not in IF_NO_PROFILE:
        raise InputError(f"--if-no-profile must be one of {', '.join(IF_NO_PROFILE)}, got {if_missing!r}")
    return if_missing


def resolve(
    levels: list[str] | tuple[str, ...],
    model: KVModel,
    profile: str | os.PathLike[str] | Profile | None = None,
    if_missing: str = "calibrate",
    progress: Progress | None = None,
) -> Resolved:
    """The codecs of ``levels`` for ``model``, calibrated when a level has a calibrated
    form and a profile is found or made (see the module's docstring)."""
    names = check_levels(levels)
    check_if_missing(if_missing)
    prof = None
    if any(is_calibrated(name) for name in names):
        prof = model_profile(model, profile, if_missing=if_missing, progress=progress)
    return Resolved(tuple(names), tuple(codec_for_level(name, prof) for name in names), prof)


def model_profile(
    km: KVModel,
    profile: str | os.PathLike[str] | Profile | None = None,
    *,
    if_missing: str = "calibrate",
    progress: Progress | None = None,
) -> Profile | None:
    """The calibration profile to encode ``km``'s lossy levels with, or None for the
    uncalibrated codecs (``if_missing="uncalibrated"`` and no profile found)."""
    check_if_missing(if_missing)
    fingerprint = km.identity()["fingerprint"]
    if isinstance(profile, Profile):
        prof = profile
    elif profile is not None:
        spec = str(profile)
        prof = find_profile(spec) if is_digest(spec) else register_profile_file(spec)
    else:
        found = list_profiles(fingerprint) or _legacy_profiles(km)
        if found:
            prof = found[0]
        elif if_missing == "uncalibrated":
            return None
        elif if_missing == "error":
            raise ProfileNotFoundError(
                f"no calibration profile for {km.name} in {', '.join(map(str, profile_dirs()))}; "
                "run `kvzip calibrate` or pass --profile"
            )
        else:
            from kvzip.levels.calibrate import calibrate, default_calibration_texts, read_texts

            texts = read_texts(default_calibration_texts())
            data, _ = calibrate(km, texts, progress=progress)
            prof = write_profile(data)
    if prof.model_fingerprint != fingerprint and prof.model_fingerprint == km.legacy_identity()["fingerprint"]:
        prof = rebind_profile(prof, fingerprint)
    prof.check_model(fingerprint)
    prof.check_geometry(km.num_layers, km.kv_heads, km.head_dim)
    return prof


def _legacy_profiles(km: KVModel) -> list[Profile]:
    """Profiles bound to the model's fingerprint as kvzip 0.x computed it (weights hashed in
    the dtype they were loaded in); :func:`model_profile` re-binds the one it takes."""
    legacy = km.legacy_identity()["fingerprint"]
    return [] if legacy == km.identity()["fingerprint"] else list_profiles(legacy)


def rebind_profile(prof: Profile, fingerprint: str) -> Profile:
    """A copy of ``prof`` bound to ``fingerprint`` (the same model's dtype-free fingerprint),
    stored beside the profiles: files written with it name the copy, files written before
    still name (and decode with) the original."""
    meta = {**prof.meta, "model_fingerprint": fingerprint, "rebound_from": prof.digest}
    return write_profile(profile_to_bytes(prof.tensors, meta))
