"""kvzip's exceptions: one type per rule broken, all under :class:`KvzipError`.

The CLI maps every ``KvzipError`` to a one-line message and a non-zero exit
code (see ``kvzip/cli/errors.py``); anything else is a bug and keeps its traceback
behind ``KVZIP_DEBUG=1``.
"""

from __future__ import annotations


class KvzipError(Exception):
    """Base class of every error kvzip raises on purpose."""

    exit_code = 1


# --- inputs ---------------------------------------------------------------
class InputError(KvzipError):
    """Missing, unreadable or unusable user input (files, text, options)."""

    exit_code = 2


class EmptyTextError(InputError):
    """The text to encode has no tokens."""


class ContextTooLongError(InputError):
    """The text has more tokens than the model's context window."""


class MemoryLimitError(KvzipError):
    """Decoding would allocate more than the memory limit (``--max-memory``)."""

    exit_code = 7


# --- the .kvz container ------------------------------------------------------
class FormatError(KvzipError):
    """A file that is not a valid ``.kvz`` (base of every container error)."""

    exit_code = 3


class BadMagicError(FormatError):
    """The file does not start with the ``.kvz`` magic bytes."""


class UnsupportedVersionError(FormatError):
    """A major version this reader does not know, or reserved bits set."""


class TruncatedFileError(FormatError):
    """The file ends before a section it declares."""


class HeaderError(FormatError):
    """The header is oversized, not JSON, or misses or mistypes a field."""


class ChunkIndexError(FormatError):
    """The chunk index is inconsistent (overlaps, out of bounds, overflow)."""


class ChecksumError(FormatError):
    """A section's bytes do not match their stored checksum."""


# --- codecs ------------------------------------------------------------------
class CodecError(KvzipError):
    """A codec cannot encode or decode the data it was given."""

    exit_code = 3


class UnknownCodecError(CodecError):
    """A codec id that is not in the registry."""


class UnknownLevelError(InputError):
    """A quality level name that kvzip does not define."""


# --- models ------------------------------------------------------------------
class ModelError(KvzipError):
    """A model cannot be loaded or used."""

    exit_code = 4


class ModelNotFoundError(ModelError):
    """The model is not on disk and no hub can be reached."""


class UnsupportedModelError(ModelError):
    """The model's cache is not plain per-layer K/V (recurrent, hybrid, latent...)."""


class ModelMismatchError(ModelError):
    """A ``.kvz`` is attached to a model other than the one that wrote it."""


# --- network -----------------------------------------------------------------
class FetchError(KvzipError):
    """A remote source misbehaved (wrong status, changed ETag, short body)."""

    exit_code = 5


# --- calibration profiles -------------------------------------------------------
class ProfileError(KvzipError):
    """A calibration profile is missing, corrupt, or belongs to another model."""

    exit_code = 6


class ProfileNotFoundError(ProfileError):
    """A ``.kvz`` (or ``--profile``) names a profile that is not in any profile directory."""


class ProfileMismatchError(ProfileError):
    """A profile whose hash, model or geometry is not the one asked for."""


# --- signals -------------------------------------------------------------------
class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (see ``kvzip.atomic.install_signal_handlers``).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks do
    not swallow it while ``finally`` blocks still remove temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        import signal

        return f"terminated by {signal.Signals(self.signum).name}"
