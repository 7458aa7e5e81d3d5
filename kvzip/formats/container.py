"""Pure parse, serialise and validate of the ``.kvz`` v1 container.

Bytes in, checked objects out; no I/O, so the reader (over any byte source) and
the writer share exactly the same rules.  ``docs/format.md`` is the byte layout
these functions implement.  Every rule a file can break raises its own
:class:`~kvzip.errors.FormatError` subclass before any payload is read.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvzip.errors import (
    BadMagicError,
    ChunkIndexError,
    HeaderError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from kvzip.formats.layout import PositionLayout
from kvzip.formats.spec import (
    DTYPES,
    FEATURES,
    FORMAT_NAME,
    INDEX_ENTRY,
    INDEX_ENTRY_SIZE,
    MAGIC,
    MAX_CHUNK_ELEMENTS,
    MAX_HEADER_BYTES,
    MAX_INDEX_ENTRIES,
    MAX_LEVELS,
    MAX_TOKEN_COUNT,
    PREAMBLE,
    PREAMBLE_SIZE,
    READ_MAJORS,
    U64_MAX,
    EntryKind,
)

# --- preamble ------------------------------------------------------------------


@dataclass(frozen=True)
class Preamble:
    """The fixed 48 bytes at the start of every ``.kvz`` (magic not included)."""

    header_length: int
    index_length: int
    header_crc: int
    index_crc: int
    data_offset: int
    major: int = 1
    minor: int = 0
    flags: int = 0

    @classmethod
    def for_sections(cls, header: bytes, index: bytes, major: int = 1) -> Preamble:
        """The preamble of a file with these header and index bytes (``major``: the
        header's :attr:`KvzHeader.major`)."""
        return cls(
            header_length=len(header),
            index_length=len(index),
            header_crc=zlib.crc32(header),
            index_crc=zlib.crc32(index),
            data_offset=PREAMBLE_SIZE + len(header) + len(index),
            major=major,
        )

    @property
    def entry_count(self) -> int:
        return self.index_length // INDEX_ENTRY_SIZE


def pack_preamble(preamble: Preamble) -> bytes:
    p = preamble
    return PREAMBLE.pack(
        MAGIC,
        p.major,
        p.minor,
        p.flags,
        p.header_length,
        p.index_length,
        p.header_crc,
        p.index_crc,
        p.data_offset,
    )


def parse_preamble(data: bytes) -> Preamble:
    """Parse and check the preamble at the start of ``data`` (at least its first 48 bytes)."""
    if data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise TruncatedFileError(f"file ends after {len(data)} bytes, inside the magic")
        raise BadMagicError("not a .kvz file (it does not start with the .kvz magic bytes)")
    if len(data) < PREAMBLE_SIZE:
        raise TruncatedFileError(
            f"file ends after {len(data)} bytes, inside the {PREAMBLE_SIZE}-byte preamble"
        )
    _, major, minor, flags, header_length, index_length, header_crc, index_crc, data_offset = (
        PREAMBLE.unpack_from(data)
    )
    if major not in READ_MAJORS:
        raise UnsupportedVersionError(
            f".kvz version {major}.{minor} is not supported "
            f"(this kvzip reads {' and '.join(f'{m}.x' for m in READ_MAJORS)})"
        )
    if flags:
        raise UnsupportedVersionError(
            f"reserved preamble flags are set (0x{flags:08x}); was this written by a newer kvzip?"
        )
    if header_length > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {header_length} exceeds the cap of {MAX_HEADER_BYTES}")
    if index_length % INDEX_ENTRY_SIZE:
        raise ChunkIndexError(
            f"index length {index_length} is not a multiple of the {INDEX_ENTRY_SIZE}-byte entry"
        )
    if index_length // INDEX_ENTRY_SIZE > MAX_INDEX_ENTRIES:
        raise ChunkIndexError(f"index holds more than {MAX_INDEX_ENTRIES} entries")
    if data_offset != PREAMBLE_SIZE + header_length + index_length:
        raise ChunkIndexError(
            f"data offset {data_offset} does not follow the header and index "
            f"(expected {PREAMBLE_SIZE + header_length + index_length})"
        )
    return Preamble(
        header_length, index_length, header_crc, index_crc, data_offset, major, minor, flags
    )


# --- header --------------------------------------------------------------------


@dataclass(frozen=True)
class QualityLevel:
    """One stored quality level: its name and the codec config that decodes it."""

    name: str
    codec: dict[str, Any]

    @property
    def profile(self) -> str | None:
        """The digest of the calibration profile the codec names (validated), if any."""
        value = self.codec.get("profile")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ModelInfo:
    """``model``: who wrote the cache.  Only ``fingerprint`` is required."""

    fingerprint: str
    name: str | None = None
    architecture: str | None = None
    tokenizer_fingerprint: str | None = None
    config_sha256: str | None = None
    weights_sha256: str | None = None

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ChatInfo:
    """``chat``: the chat template around the cached document (prefix + document +
    separator + question + suffix renders one user turn and the assistant's opening)."""

    prefix: str
    separator: str
    suffix: str


@dataclass(frozen=True)
class ProfileInfo:
    """``profile``: the calibration profile the lossy levels use, by SHA-256 and size."""

    digest: str
    bytes: int | None = None


@dataclass(frozen=True)
class SourceInfo:
    """``source``: the text the cache was made from (its file name and SHA-256)."""

    name: str
    sha256: str


class KvzHeader:
    """A validated header: typed views over the JSON object, kept whole in ``raw``.

    Construction validates every field kvzip writes (required or optional), so
    holding a ``KvzHeader`` means the shapes and caps are sane and every optional
    object has the types its readers expect; a malformed one is a one-line
    :class:`~kvzip.errors.HeaderError`.  Unknown fields stay in ``raw`` untouched.
    """

    def __init__(self, raw: Any, major: int | None = None):
        self.levels = _check_header(raw)
        self.raw: dict[str, Any] = raw
        self.features = _check_features(raw, major)
        self.major = 2 if self.features else 1
        self.rope_tables, self.layer_rope = _check_rope(raw["rope"], raw["head_dim"], raw["num_layers"],
                                                       "rope-tables" in self.features)
        self._layout: PositionLayout | None = None
        if "positions" in self.features:
            self._layout = PositionLayout.from_json(_required(raw, "positions"), raw["num_layers"],
                                                    raw["kv_heads"], raw["token_count"])
        self.model = _model_info(raw["model"])
        self.chat = _optional(raw, "chat", _chat_info)
        self.profile = _optional(raw, "profile", _profile_info)
        self.source = _optional(raw, "source", _source_info)
        self.created = _optional(raw, "created", _string)
        self.kvzip_version = _optional(raw, "kvzip_version", _string)

    def profile_digests(self, levels: Iterable[str] | None = None) -> list[str]:
        """The profile digests the codecs of ``levels`` (default: every level) name, in
        order and once each; with every level, the header's own ``profile`` too."""
        wanted = None if levels is None else set(levels)
        found = [lv.profile for lv in self.levels
                 if lv.profile is not None and (wanted is None or lv.name in wanted)]
        if levels is None and self.profile is not None:
            found.append(self.profile.digest)
        return list(dict.fromkeys(found))

    def profile_bytes(self, digest: str) -> int | None:
        """The size the header's ``profile`` entry gives ``digest``, if it gives one."""
        return self.profile.bytes if self.profile is not None and self.profile.digest == digest else None

    @property
    def num_layers(self) -> int:
        return self.raw["num_layers"]

    @property
    def kv_heads(self) -> int:
        return self.raw["kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.raw["head_dim"]

    @property
    def dtype(self) -> str:
        return self.raw["dtype"]

    @property
    def token_count(self) -> int:
        return self.raw["token_count"]

    @property
    def chunk_tokens(self) -> int:
        return self.raw["chunk_tokens"]

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def level_index(self, name: str) -> int:
        """Position of the level called ``name``; ``KeyError`` if the file has none."""
        for i, level in enumerate(self.levels):
            if level.name == name:
                return i
        raise KeyError(name)

    @property
    def rope_inv_freq(self) -> tuple[float, ...] | None:
        """The one RoPE table every layer uses (None: no rotary embedding, or one per layer)."""
        if self.rope_tables is None or len(self.rope_tables) != 1:
            return None
        return self.rope_tables[0]

    def layer_rope_inv_freq(self, layer: int) -> tuple[float, ...] | None:
        """Layer ``layer``'s RoPE inverse frequencies, or None when it has none recorded."""
        if self.rope_tables is None:
            return None
        return self.rope_tables[self.layer_rope[layer]]

    @property
    def layout(self) -> PositionLayout:
        """Which positions each (layer, kv head) holds (every one, in a 1.x file)."""
        if self._layout is None:
            self._layout = PositionLayout.dense(self.num_layers, self.kv_heads, self.token_count)
        return self._layout

    @property
    def is_dense(self) -> bool:
        return "positions" not in self.features

    @property
    def model_fingerprint(self) -> str:
        return self.model.fingerprint

    def __repr__(self) -> str:
        return (
            f"KvzHeader(model={self.model_fingerprint!r}, tokens={self.token_count}, "
            f"levels={list(self.level_names)})"
        )


def new_header(
    *,
    model: Mapping[str, Any],
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    token_count: int,
    chunk_tokens: int,
    levels: Sequence[tuple[str, Mapping[str, Any]]],
    rope_inv_freq: Sequence[float] | None = None,
    rope_tables: Sequence[Sequence[float]] | None = None,
    layer_rope: Sequence[int] | None = None,
    layout: PositionLayout | None = None,
    attention: Mapping[str, Any] | None = None,
    profile: ProfileInfo | None = None,
    chat: ChatInfo | None = None,
    source: SourceInfo | None = None,
    created: str | None = None,
    kvzip_version: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> KvzHeader:
    """The one place a writer's header is put together, validated as a reader will
    validate it (``extra``: further fields, kept as they are).

    RoPE: one table (``rope_inv_freq``), or ``rope_tables`` with each layer's index into
    them (``layer_rope``).  ``layout``: the positions each (layer, kv head) holds; a dense
    one, or none, writes no ``positions``.  The version follows: 2.0 with the features a
    file needs (several RoPE tables, a layout that is not dense), else 1.0.
    ``attention``: what the model's layers attend to (informational, for ``info``)."""
    features = []
    rope: dict[str, Any] | None = None
    if rope_tables is not None and len({tuple(t) for t in rope_tables}) > 1:
        features.append("rope-tables")
        rope = {"tables": [[float(f) for f in t] for t in rope_tables],
                "layer_table": [int(i) for i in layer_rope]}
    elif rope_tables is not None:
        rope = {"inv_freq": [float(f) for f in rope_tables[0]]}
    elif rope_inv_freq is not None:
        rope = {"inv_freq": [float(f) for f in rope_inv_freq]}
    positions = None
    if layout is not None and not layout.is_dense():
        features.insert(0, "positions")
        positions = layout.to_json()
    raw: dict[str, Any] = {
        "format": FORMAT_NAME,
        **({"kvzip_version": kvzip_version} if kvzip_version is not None else {}),
        **({"created": created} if created is not None else {}),
        "model": dict(model),
        "num_layers": num_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "token_count": token_count,
        "chunk_tokens": chunk_tokens,
        "levels": [{"name": name, "codec": dict(codec)} for name, codec in levels],
        **({"features": features} if features else {}),
        "rope": rope,
        **({"positions": positions} if positions is not None else {}),
        **({"attention": dict(attention)} if attention is not None else {}),
        **({"profile": _drop_none(profile.__dict__)} if profile is not None else {}),
        **({"chat": dict(chat.__dict__)} if chat is not None else {}),
        **({"source": dict(source.__dict__)} if source is not None else {}),
        **dict(extra or {}),
    }
    header = KvzHeader(json.loads(encode_header(raw)))  # exactly what a reader will parse
    if layout is not None and positions is not None:
        header._layout = layout  # the same positions, without decoding them again
    return header


def _drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def encode_header(fields: Mapping[str, Any]) -> bytes:
    """Header fields -> the UTF-8 JSON bytes stored in the file."""
    try:
        data = json.dumps(
            fields, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise HeaderError(f"header is not plain JSON: {exc}") from None
    if len(data) > MAX_HEADER_BYTES:
        raise HeaderError(f"header is {len(data)} bytes; the cap is {MAX_HEADER_BYTES}")
    return data


def parse_header(data: bytes, major: int | None = None) -> KvzHeader:
    """Parse and fully validate the header's JSON bytes (``major``: the file's version,
    which must match the features the header lists; None skips that check)."""
    if len(data) > MAX_HEADER_BYTES:
        raise HeaderError(f"header is {len(data)} bytes; the cap is {MAX_HEADER_BYTES}")
    try:
        raw = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_non_finite,
        )
    except RecursionError:
        raise HeaderError("header JSON nests too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise HeaderError(f"header is not UTF-8 JSON: {exc}") from None
    return KvzHeader(raw, major)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers must never see two different values for one field.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise HeaderError("header JSON repeats a key in one object")
    return obj


def _reject_non_finite(name: str) -> Any:
    raise HeaderError(f"header JSON holds {name}, which is not standard JSON")


def _check_header(raw: Any) -> tuple[QualityLevel, ...]:
    """Validate the required fields; return the parsed levels."""
    if not isinstance(raw, dict):
        raise HeaderError("header must be a JSON object")
    if _required(raw, "format") != FORMAT_NAME:
        raise HeaderError(f"header field 'format' must be {FORMAT_NAME!r}")
    model = _object(_required(raw, "model"), "model")
    _string(_required(model, "fingerprint", "model."), "model.fingerprint")
    for name in ("name", "architecture", "tokenizer_fingerprint"):
        if name in model:
            _string(model[name], f"model.{name}")
    layers, heads, head_dim, tokens, chunk_tokens = (
        _positive_int(_required(raw, name), name)
        for name in ("num_layers", "kv_heads", "head_dim", "token_count", "chunk_tokens")
    )
    if tokens > MAX_TOKEN_COUNT:
        raise HeaderError(f"header field 'token_count' is {tokens}; the cap is {MAX_TOKEN_COUNT}")
    chunk_elements = 2 * layers * heads * head_dim * chunk_tokens
    if chunk_elements > MAX_CHUNK_ELEMENTS:
        raise HeaderError(
            f"a chunk of {chunk_tokens} tokens would hold {chunk_elements} K/V elements; "
            f"the cap is {MAX_CHUNK_ELEMENTS} (check num_layers, kv_heads, head_dim, chunk_tokens)"
        )
    if _required(raw, "dtype") not in DTYPES:
        raise HeaderError(f"header field 'dtype' must be one of {', '.join(DTYPES)}")
    _required(raw, "rope")
    return _check_levels(_required(raw, "levels"))


def _check_features(raw: dict[str, Any], major: int | None) -> tuple[str, ...]:
    """The 2.x features the header lists: none in a 1.x file; known ones, at least one,
    in a 2.x file.  An unknown feature is refused by name, so a newer file never decodes
    to a wrong cache here."""
    features = raw.get("features")
    if features is None:
        if major is not None and major >= 2:
            raise HeaderError(f"a version {major} header must list its 'features'")
        return ()
    if major is not None and major < 2:
        raise HeaderError("header field 'features' belongs to version 2 files; this one is 1.x")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise HeaderError("header field 'features' must be a non-empty list of strings")
    if len(set(features)) != len(features):
        raise HeaderError("header field 'features' lists a feature twice")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise UnsupportedVersionError(
            f"this .kvz needs the feature {unknown[0]!r}, which this kvzip does not read "
            f"(it reads: {', '.join(FEATURES)})")
    return tuple(features)


def _optional(raw: dict[str, Any], key: str, parse: Any) -> Any:
    """An optional field: absent or null is None, anything else must parse."""
    value = raw.get(key)
    return None if value is None else parse(value, key)


def _model_info(value: Any, field: str = "model") -> ModelInfo:
    model = _object(value, field)
    known = {k: _string(model[k], f"{field}.{k}") for k in ModelInfo.__dataclass_fields__ if k in model}
    return ModelInfo(**known)


def _chat_info(value: Any, field: str) -> ChatInfo:
    chat = _object(value, field)
    return ChatInfo(*(_string(_required(chat, k, f"{field}."), f"{field}.{k}")
                      for k in ("prefix", "separator", "suffix")))


def _profile_info(value: Any, field: str) -> ProfileInfo:
    entry = _object(value, field)
    size = entry.get("bytes")
    if size is not None:
        size = _positive_int(size, f"{field}.bytes")
    return ProfileInfo(_digest(_required(entry, "digest", f"{field}."), f"{field}.digest"), size)


def _source_info(value: Any, field: str) -> SourceInfo:
    source = _object(value, field)
    return SourceInfo(_string(_required(source, "name", f"{field}."), f"{field}.name"),
                      _digest(_required(source, "sha256", f"{field}."), f"{field}.sha256"))


def _digest(value: Any, field: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise HeaderError(f"header field '{field}' must be a SHA-256 (64 lowercase hex digits), "
                          f"got {str(value)[:80]!r}")
    return value


def _check_rope(rope: Any, head_dim: int, num_layers: int, tables: bool
                ) -> tuple[tuple[tuple[float, ...], ...] | None, tuple[int, ...]]:
    """RoPE tables and each layer's index into them: one ``inv_freq`` for every layer,
    or (feature ``rope-tables``) ``tables`` with ``layer_table``."""
    if rope is None:
        return None, (0,) * num_layers
    rope = _object(rope, "rope")
    if not tables:
        return (_inv_freq(_required(rope, "inv_freq", "rope."), head_dim, "rope.inv_freq"),), (0,) * num_layers
    listed = _required(rope, "tables", "rope.")
    if not isinstance(listed, list) or not 0 < len(listed) <= num_layers:
        raise HeaderError(f"header field 'rope.tables' must be a list of 1 to {num_layers} tables")
    parsed = tuple(_inv_freq(t, head_dim, f"rope.tables[{i}]") for i, t in enumerate(listed))
    index = _required(rope, "layer_table", "rope.")
    if (not isinstance(index, list) or len(index) != num_layers
            or not all(type(i) is int and 0 <= i < len(parsed) for i in index)):
        raise HeaderError(f"header field 'rope.layer_table' must be {num_layers} indices into 'rope.tables'")
    return parsed, tuple(index)


def _inv_freq(value: Any, head_dim: int, field: str) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or len(value) != head_dim // 2
        or not all(_is_finite_number(f) for f in value)
    ):
        raise HeaderError(f"header field '{field}' must be a list of {head_dim // 2} finite numbers")
    return tuple(float(f) for f in value)


def _check_levels(levels: Any) -> tuple[QualityLevel, ...]:
    if not isinstance(levels, list) or not 0 < len(levels) <= MAX_LEVELS:
        raise HeaderError(f"header field 'levels' must be a list of 1 to {MAX_LEVELS} levels")
    parsed = []
    for i, level in enumerate(levels):
        where = f"levels[{i}]"
        level = _object(level, where)
        name = _string(_required(level, "name", f"{where}."), f"{where}.name")
        codec = _object(_required(level, "codec", f"{where}."), f"{where}.codec")
        _string(_required(codec, "id", f"{where}.codec."), f"{where}.codec.id")
        if "profile" in codec:  # a codec names its calibration profile by digest
            _digest(codec["profile"], f"{where}.codec.profile")
        parsed.append(QualityLevel(name, codec))
    names = [level.name for level in parsed]
    if len(set(names)) != len(names):
        raise HeaderError("header field 'levels' names a level twice")
    return tuple(parsed)


def _required(obj: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in obj:
        raise HeaderError(f"header field '{prefix}{key}' is missing")
    return obj[key]


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HeaderError(f"header field '{field}' must be an object")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"header field '{field}' must be a string")
    return value


def _positive_int(value: Any, field: str) -> int:
    if type(value) is not int or value <= 0:  # type() check: bool is an int subclass
        raise HeaderError(f"header field '{field}' must be a positive integer, got {value!r:.40}")
    return value


def _is_finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


# --- index ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: an index may hold a million of these
class IndexEntry:
    """One index entry: what a payload holds and where its bytes are."""

    kind: EntryKind
    level: int  # index into header levels (KV); 0 for other kinds
    chunk: int
    token_start: int
    token_count: int
    offset: int  # absolute, in bytes from the start of the file
    length: int
    crc32: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def token_range(self) -> tuple[int, int]:
        return self.token_start, self.token_start + self.token_count


def pack_index(entries: Iterable[IndexEntry]) -> bytes:
    return b"".join(
        INDEX_ENTRY.pack(
            e.kind,
            e.level,
            0,
            e.chunk,
            e.token_start,
            e.token_count,
            e.offset,
            e.length,
            e.crc32,
            0,
        )
        for e in entries
    )


def parse_index(data: bytes) -> list[IndexEntry]:
    """Parse index bytes; unknown kinds and non-zero reserved fields are errors."""
    if len(data) % INDEX_ENTRY_SIZE:
        raise ChunkIndexError(
            f"index length {len(data)} is not a multiple of the {INDEX_ENTRY_SIZE}-byte entry"
        )
    if len(data) // INDEX_ENTRY_SIZE > MAX_INDEX_ENTRIES:
        raise ChunkIndexError(f"index holds more than {MAX_INDEX_ENTRIES} entries")
    known_kinds = {kind.value for kind in EntryKind}
    entries = []
    for i, fields in enumerate(INDEX_ENTRY.iter_unpack(data)):
        kind, level, reserved_a, chunk, start, count, offset, length, crc, reserved_b = fields
        if kind not in known_kinds:
            raise ChunkIndexError(f"index entry {i} has unknown kind {kind}")
        if reserved_a or reserved_b:
            raise ChunkIndexError(f"index entry {i} has non-zero reserved fields")
        entries.append(IndexEntry(EntryKind(kind), level, chunk, start, count, offset, length, crc))
    return entries


def describe_entry(entry: IndexEntry, level_names: Sequence[str]) -> str:
    """A human name for an entry, for error messages."""
    if entry.kind is EntryKind.KV:
        level = level_names[entry.level] if entry.level < len(level_names) else entry.level
        return f"chunk {entry.chunk} of level {level!r}"
    if entry.kind is EntryKind.TEXT:
        return f"text of chunk {entry.chunk}"
    return "token ids"


@dataclass(frozen=True)
class ChunkIndex:
    """A validated index, grouped the way readers use it."""

    kv: tuple[tuple[IndexEntry, ...], ...]  # per header level, in chunk order
    token_ids: IndexEntry
    texts: tuple[IndexEntry, ...] | None  # in chunk order; None when the file has none


def validate(
    header: KvzHeader, entries: Sequence[IndexEntry], file_size: int, data_offset: int
) -> ChunkIndex:
    """Check every entry against the header and the file before any payload is read.

    Payloads lie inside ``[data_offset, file_size)`` without overlapping; each
    level's chunks number 0..n-1 and tile tokens ``[0, token_count)`` in order,
    every level (and the optional texts) with the same token ranges.
    """
    if data_offset > file_size:
        raise TruncatedFileError(
            f"file is {file_size} bytes but its header and index end at byte {data_offset}"
        )
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ChunkIndexError(f"index holds more than {MAX_INDEX_ENTRIES} entries")
    names = header.level_names
    for entry in entries:
        _check_entry_bounds(entry, names, file_size, data_offset)
    by_offset = sorted(entries, key=lambda e: e.offset)
    for before, after in itertools.pairwise(by_offset):
        if after.offset < before.end:
            raise ChunkIndexError(
                f"{describe_entry(after, names)} overlaps {describe_entry(before, names)}"
            )

    kv: list[list[IndexEntry]] = [[] for _ in names]
    token_ids: list[IndexEntry] = []
    texts: list[IndexEntry] = []
    for entry in entries:
        if entry.kind is EntryKind.KV:
            kv[entry.level].append(entry)
        elif entry.kind is EntryKind.TOKEN_IDS:
            token_ids.append(entry)
        else:
            texts.append(entry)

    kv_chunks = tuple(
        _check_chunks(chunks, header, f"level {name!r}")
        for name, chunks in zip(names, kv, strict=True)
    )
    ranges = [e.token_range for e in kv_chunks[0]]
    for name, chunks in zip(names[1:], kv_chunks[1:], strict=True):
        if [e.token_range for e in chunks] != ranges:
            raise ChunkIndexError(
                f"level {name!r} splits the tokens differently from level {names[0]!r}"
            )
    if len(token_ids) != 1:
        raise ChunkIndexError(f"index must hold exactly one token-id entry, found {len(token_ids)}")
    tokens = token_ids[0]
    if (tokens.chunk, tokens.token_start, tokens.token_count) != (0, 0, header.token_count):
        raise ChunkIndexError(
            f"token-id entry must be chunk 0 covering tokens [0, {header.token_count})"
        )
    text_chunks = None
    if texts:
        text_chunks = _check_chunks(texts, header, "chunk texts")
        if [e.token_range for e in text_chunks] != ranges:
            raise ChunkIndexError("chunk texts do not match the KV chunks' token ranges")
    return ChunkIndex(kv=kv_chunks, token_ids=tokens, texts=text_chunks)


def _check_entry_bounds(
    entry: IndexEntry, level_names: Sequence[str], file_size: int, data_offset: int
) -> None:
    what = describe_entry(entry, level_names)
    if entry.kind is EntryKind.KV:
        if entry.level >= len(level_names):
            raise ChunkIndexError(f"{what}: the header defines only {len(level_names)} level(s)")
    elif entry.level != 0:
        raise ChunkIndexError(f"{what}: level must be 0, got {entry.level}")
    if entry.length == 0:
        raise ChunkIndexError(f"{what}: empty payload")
    if entry.offset < data_offset:
        raise ChunkIndexError(
            f"{what}: offset {entry.offset} points before the data region at {data_offset}"
        )
    if entry.end > U64_MAX:
        raise ChunkIndexError(f"{what}: offset {entry.offset} + length {entry.length} overflows")
    if entry.end > file_size:
        raise TruncatedFileError(
            f"{what} ends at byte {entry.end} but the file has only {file_size} bytes"
        )


def _check_chunks(
    entries: list[IndexEntry], header: KvzHeader, what: str
) -> tuple[IndexEntry, ...]:
    """Chunks numbered 0..n-1 that tile tokens [0, token_count) in order."""
    chunks = sorted(entries, key=lambda e: e.chunk)
    next_token = 0
    for number, entry in enumerate(chunks):
        if entry.chunk < number:
            raise ChunkIndexError(f"{what}: chunk {entry.chunk} appears twice")
        if entry.chunk > number:
            raise ChunkIndexError(f"{what}: chunk {number} is missing")
        if entry.token_start != next_token:
            raise ChunkIndexError(
                f"{what}: chunk {number} starts at token {entry.token_start}, expected {next_token}"
            )
        if not 0 < entry.token_count <= header.chunk_tokens:
            raise ChunkIndexError(
                f"{what}: chunk {number} holds {entry.token_count} tokens "
                f"(must be 1 to chunk_tokens={header.chunk_tokens})"
            )
        next_token += entry.token_count
    if next_token != header.token_count:
        raise ChunkIndexError(
            f"{what}: chunks cover {next_token} tokens, the header says {header.token_count}"
        )
    return tuple(chunks)
