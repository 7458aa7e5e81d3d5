"""The ``.kvz`` container: round trips, one test per rule of docs/format.md, attack files."""

from __future__ import annotations

import json
import os
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kvzip.errors as errors
from kvzip.codecs import ChunkContext, Codec, codec_from_config, register_codec
from kvzip.formats import (
    BytesSource,
    ChatInfo,
    EntryKind,
    FileSource,
    IndexEntry,
    KvzHeader,
    KvzReader,
    KvzWriter,
    Preamble,
    ProfileInfo,
    SourceInfo,
    checked_range,
    encode_header,
    new_header,
    open_kvz,
    pack_index,
    pack_preamble,
    parse_header,
    parse_index,
    parse_preamble,
    validate,
)
from kvzip.formats.limits import set_memory_limit
from kvzip.formats.spec import (
    FIRST_READ_BYTES,
    MAX_HEADER_BYTES,
    PREAMBLE_SIZE,
    U64_MAX,
)
from kvzip.levels import open_cache

LAYERS, HEADS, HEAD_DIM = 2, 3, 4
TOKENS, CHUNK = 37, 16  # three chunks, the last one short
LEVELS = [
    {"name": "lossless", "codec": {"id": "bytegroup-zstd", "zstd_level": 3}},
    {"name": "lossless-max", "codec": {"id": "bytegroup-zstd", "zstd_level": 19}},
]
ATTACKS = Path(__file__).parent / "fixtures" / "attacks"


def synthetic_kv(dtype: str, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(
        (2, LAYERS, HEADS, TOKENS, HEAD_DIM), dtype=np.float32
    )
    if dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(dtype)


def make_header(dtype: str = "float16", **fields: Any) -> dict[str, Any]:
    header = {
        "format": "kvz",
        "model": {"fingerprint": "sha256:test", "name": "test-model"},
        "num_layers": LAYERS,
        "kv_heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": dtype,
        "token_count": TOKENS,
        "chunk_tokens": CHUNK,
        "levels": LEVELS,
        "rope": {"inv_freq": [1.0, 0.01], "theta": 10000.0},
        "chat": None,
    }
    header.update(fields)
    return header


def chunk_ranges() -> list[tuple[int, int]]:
    return [(start, min(CHUNK, TOKENS - start)) for start in range(0, TOKENS, CHUNK)]


def encode_chunks(kv: np.ndarray, dtype: str) -> list[tuple[int, int, int, int, bytes]]:
    """``add_kv`` arguments for every chunk at every level of LEVELS."""
    codecs = [codec_from_config(level["codec"]) for level in LEVELS]
    calls = []
    for chunk, (start, count) in enumerate(chunk_ranges()):
        ctx = ChunkContext(start, count, LAYERS, HEADS, HEAD_DIM, dtype)
        piece = np.ascontiguousarray(kv[:, :, :, start : start + count])
        for level, codec in enumerate(codecs):
            calls.append((chunk, level, start, count, codec.encode(piece, ctx)))
    return calls


def write_kvz(path: Path, kv: np.ndarray, dtype: str, header: dict | None = None) -> Path:
    """A complete file: every chunk at every level, token ids and texts.

    Payloads always come from LEVELS' codecs, whatever codec ``header`` names."""
    with KvzWriter(path, header or make_header(dtype)) as writer:
        for args in encode_chunks(kv, dtype):
            writer.add_kv(*args)
        for chunk, (start, count) in enumerate(chunk_ranges()):
            writer.add_text(chunk, start, count, f"chunk {chunk} ✓")
        writer.set_token_ids(np.arange(TOKENS) * 7)
        writer.commit()
    return path


@pytest.fixture
def kvz_bytes(tmp_path: Path) -> bytes:
    return write_kvz(tmp_path / "ctx.kvz", synthetic_kv("float16"), "float16").read_bytes()


def split(data: bytes) -> tuple[Preamble, bytes, list[IndexEntry], bytes]:
    preamble = parse_preamble(data)
    header_end = PREAMBLE_SIZE + preamble.header_length
    entries = parse_index(data[header_end : preamble.data_offset])
    return preamble, data[PREAMBLE_SIZE:header_end], entries, data[preamble.data_offset :]


def reseal(
    data: bytes,
    *,
    header: dict | None = None,
    entries: list[IndexEntry] | None = None,
    **preamble_fields: int,
) -> bytes:
    """``data`` with its header or entries replaced, checksums recomputed, then
    ``preamble_fields`` forced; payload offsets follow the data region if it moves."""
    old, header_bytes, old_entries, region = split(data)
    if header is not None:
        header_bytes = json.dumps(header).encode()
    entries = old_entries if entries is None else entries
    shift = PREAMBLE_SIZE + len(header_bytes) + 40 * len(entries) - old.data_offset
    index = pack_index(replace(e, offset=e.offset + shift) for e in entries)
    preamble = replace(Preamble.for_sections(header_bytes, index), **preamble_fields)
    return pack_preamble(preamble) + header_bytes + index + region


def open_bytes(data: bytes) -> KvzReader:
    return open_cache(BytesSource(data))


def header_of(data: bytes) -> dict:
    return json.loads(split(data)[1])


class CountingSource(BytesSource):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.calls: list[tuple[int, int]] = []

    def get_bytes(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return super().get_bytes(offset, length)


# --- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: str):
    kv = synthetic_kv(dtype)
    with open_cache(write_kvz(tmp_path / "ctx.kvz", kv, dtype)) as reader:
        assert reader.version == (1, 0)
        assert reader.header.level_names == ("lossless", "lossless-max")
        assert reader.header.rope_inv_freq == (1.0, 0.01)
        assert reader.header.model_fingerprint == "sha256:test"
        for name in reader.header.level_names:
            decoded = reader.decode_level(name)
            assert decoded.dtype == kv.dtype
            assert decoded.tobytes() == kv.tobytes()
            entries = reader.kv_entries(name)
            assert [(e.token_start, e.token_count) for e in entries] == chunk_ranges()
            for entry in entries:
                start, end = entry.token_range
                assert reader.decode_chunk(entry).tobytes() == kv[:, :, :, start:end].tobytes()
        np.testing.assert_array_equal(reader.token_ids(), np.arange(TOKENS) * 7)
        assert reader.token_ids().dtype == np.int64
        assert reader.chunk_texts() == ["chunk 0 ✓", "chunk 1 ✓", "chunk 2 ✓"]
        assert reader.verify() == []
        assert reader.verify(decode=True) == []


def test_chunk_context_comes_from_header_and_entry(kvz_bytes: bytes):
    reader = open_bytes(kvz_bytes)
    entry = reader.kv_entries("lossless")[2]
    assert reader.codecs.context(entry) == ChunkContext(
        32, 5, LAYERS, HEADS, HEAD_DIM, "float16", rope_inv_freq=(1.0, 0.01)
    )


def test_unknown_level_name_is_an_input_error(kvz_bytes: bytes):
    with pytest.raises(errors.UnknownLevelError, match="lossless-max"):
        open_bytes(kvz_bytes).kv_entries("nope")


def test_file_without_texts_has_no_chunk_texts(kvz_bytes: bytes):
    entries = [e for e in split(kvz_bytes)[2] if e.kind is not EntryKind.TEXT]
    assert open_bytes(reseal(kvz_bytes, entries=entries)).chunk_texts() is None


def test_layout_does_not_depend_on_add_order(tmp_path: Path):
    payloads = encode_chunks(synthetic_kv("float32"), "float32")
    files = []
    for name, order in (("forward.kvz", payloads), ("backward.kvz", payloads[::-1])):
        with KvzWriter(tmp_path / name, make_header("float32")) as writer:
            writer.set_token_ids(np.zeros(TOKENS, dtype=np.int32))
            for args in order:
                writer.add_kv(*args)
            writer.commit()
        files.append((tmp_path / name).read_bytes())
    assert files[0] == files[1]
    entries = split(files[0])[2]
    assert entries[0].kind is EntryKind.TOKEN_IDS
    assert [(e.chunk, e.level) for e in entries[1:]] == [(c, level) for c, level, *_ in payloads]


@pytest.mark.parametrize("extra_bytes, reads_before_payload", [(0, 1), (100_000, 2)])
def test_at_most_two_reads_before_the_first_payload(
    tmp_path: Path, extra_bytes: int, reads_before_payload: int
):
    header = make_header("float16", notes="x" * extra_bytes)
    data = write_kvz(tmp_path / "ctx.kvz", synthetic_kv("float16"), "float16", header).read_bytes()
    assert (split(data)[0].data_offset > FIRST_READ_BYTES) == (reads_before_payload == 2)
    source = CountingSource(data)
    reader = open_cache(source)
    assert len(source.calls) == reads_before_payload
    assert source.calls[0] == (0, min(len(data), FIRST_READ_BYTES))
    first = reader.kv_entries("lossless")[0]
    reader.decode_chunk(first)
    assert source.calls[-1] == (first.offset, first.length)
    assert len(source.calls) == reads_before_payload + 1


# --- preamble rules --------------------------------------------------------------


def test_bad_magic(kvz_bytes: bytes):
    with pytest.raises(errors.BadMagicError):
        open_bytes(b"GGUF" + kvz_bytes[4:])
    with pytest.raises(errors.BadMagicError):
        open_bytes(b"hi")


@pytest.mark.parametrize(
    "cut", ["empty", 5, 47, "in header", "in index", "in payload", "last byte"]
)
def test_truncated_file(kvz_bytes: bytes, cut: int | str):
    preamble = split(kvz_bytes)[0]
    at = {
        "empty": 0,
        "in header": PREAMBLE_SIZE + 10,
        "in index": preamble.data_offset - 1,
        "in payload": preamble.data_offset + 5,
        "last byte": len(kvz_bytes) - 1,
    }.get(cut, cut)
    with pytest.raises(errors.TruncatedFileError):
        open_bytes(kvz_bytes[:at])


@pytest.mark.parametrize("major", [0, 3, 0xFFFF])
def test_unknown_major_version(kvz_bytes: bytes, major: int):
    with pytest.raises(errors.UnsupportedVersionError, match=f"version {major}"):
        open_bytes(reseal(kvz_bytes, major=major))


def test_version_2_without_features_is_refused(kvz_bytes: bytes):
    # A 2.x header must say which 2.x features it needs; a 1.x header relabelled is not one.
    with pytest.raises(errors.HeaderError, match="features"):
        open_bytes(reseal(kvz_bytes, major=2))


def test_nonzero_flags(kvz_bytes: bytes):
    with pytest.raises(errors.UnsupportedVersionError, match="flags"):
        open_bytes(reseal(kvz_bytes, flags=1))


def test_newer_minor_with_unknown_header_field_still_reads(kvz_bytes: bytes):
    header = header_of(kvz_bytes) | {"from_the_future": {"anything": [1, 2]}}
    reader = open_bytes(reseal(kvz_bytes, header=header, minor=7))
    assert reader.version == (1, 7)
    assert reader.header.raw["from_the_future"] == {"anything": [1, 2]}
    assert reader.decode_level("lossless").tobytes() == synthetic_kv("float16").tobytes()


def test_oversized_header_length(kvz_bytes: bytes):
    with pytest.raises(errors.HeaderError, match="cap"):
        open_bytes(reseal(kvz_bytes, header_length=MAX_HEADER_BYTES + 1))


def test_data_offset_must_follow_the_index(kvz_bytes: bytes):
    preamble = split(kvz_bytes)[0]
    with pytest.raises(errors.ChunkIndexError, match="data offset"):
        open_bytes(reseal(kvz_bytes, data_offset=preamble.data_offset + 40))


# --- checksums -------------------------------------------------------------------


def flip_bit(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1 :]


def test_flipped_bit_in_payload_names_chunk_and_level(kvz_bytes: bytes):
    reader = open_bytes(kvz_bytes)
    target = reader.kv_entries("lossless-max")[1]
    reader = open_bytes(flip_bit(kvz_bytes, target.offset + target.length // 2))
    with pytest.raises(errors.ChecksumError, match="chunk 1 of level 'lossless-max'"):
        reader.decode_chunk(target)
    with pytest.raises(errors.ChecksumError):
        reader.decode_level("lossless-max")
    assert reader.decode_level("lossless").tobytes() == synthetic_kv("float16").tobytes()
    problems = reader.verify()
    assert [p.entry for p in problems] == [target]
    assert "checksum" in problems[0].message


@pytest.mark.parametrize("section", ["header", "index"])
def test_flipped_bit_in_header_or_index(kvz_bytes: bytes, section: str):
    preamble = split(kvz_bytes)[0]
    position = PREAMBLE_SIZE + 3 if section == "header" else preamble.data_offset - 30
    with pytest.raises(errors.ChecksumError, match=section):
        open_bytes(flip_bit(kvz_bytes, position))


# --- index rules -----------------------------------------------------------------


def edit_entry(position: int, **fields: int):
    def edit(entries: list[IndexEntry]) -> list[IndexEntry]:
        entries[position] = replace(entries[position], **fields)
        return entries

    return edit


def drop(predicate):
    return lambda entries: [e for e in entries if not predicate(e)]


def split_level_1_differently(entries: list[IndexEntry]) -> list[IndexEntry]:
    """Level 1 tiles the tokens as 15 + 16 + 6: valid alone, unlike level 0."""
    starts, counts = iter([0, 15, 31]), iter([15, 16, 6])
    return [
        replace(e, token_start=next(starts), token_count=next(counts))
        if e.kind is EntryKind.KV and e.level == 1
        else e
        for e in entries
    ]


# The index order of a written file: token ids, then per chunk: level 0, level 1, text.
TOKEN_IDS, KV0, KV0_MAX, TEXT0, KV1 = 0, 1, 2, 3, 4
SLACK = 1000  # validate() is told the file is this much longer than the bytes we have

INDEX_RULES = {  # rule -> (edit of the entries, expected message)
    "entry before data region": (edit_entry(KV0, offset=PREAMBLE_SIZE), "before the data region"),
    "u64 overflow offset": (edit_entry(KV0, offset=U64_MAX - 7, length=16), "overflows"),
    "u64 max length": (edit_entry(KV0, length=U64_MAX), "overflows"),
    "overlapping entries": (
        lambda es: [*es[:KV1], replace(es[KV1], offset=es[KV0].offset + 1), *es[KV1 + 1 :]],
        "chunk 1 of level 'lossless' overlaps chunk 0 of level 'lossless'",
    ),
    "empty payload": (edit_entry(KV0, length=0), "empty payload"),
    "level out of range": (edit_entry(KV0, level=2), "defines only 2 level"),
    "token ids at level 1": (edit_entry(TOKEN_IDS, level=1), "level must be 0"),
    "missing chunk": (
        drop(lambda e: e.kind is EntryKind.KV and e.chunk == 1 and e.level == 0),
        "level 'lossless': chunk 1 is missing",
    ),
    "repeated chunk": (edit_entry(KV1, chunk=0), "level 'lossless': chunk 0 appears twice"),
    "gap in tokens": (edit_entry(KV1, token_start=17), "starts at token 17, expected 16"),
    "too few tokens": (edit_entry(KV1, token_count=0), "holds 0 tokens"),
    "levels split differently": (split_level_1_differently, "splits the tokens differently"),
    "missing token ids": (drop(lambda e: e.kind is EntryKind.TOKEN_IDS), "found 0"),
    "two token-id entries": (
        lambda es: [*es, replace(es[TOKEN_IDS], offset=es[-1].end + 1, length=1)],
        "found 2",
    ),
    "token ids wrong count": (edit_entry(TOKEN_IDS, token_count=TOKENS - 1), "covering tokens"),
    "text ranges differ": (edit_entry(TEXT0, token_count=15), "chunk texts: chunk 1 starts"),
    "missing text": (
        drop(lambda e: e.kind is EntryKind.TEXT and e.chunk == 2),
        "chunk texts: chunks cover 32",
    ),
}


@pytest.mark.parametrize("rule", INDEX_RULES)
def test_index_rule(kvz_bytes: bytes, rule: str):
    edit, message = INDEX_RULES[rule]
    preamble, header, entries, _ = split(kvz_bytes)
    with pytest.raises(errors.ChunkIndexError, match=message):
        validate(parse_header(header), edit(entries), len(kvz_bytes) + SLACK, preamble.data_offset)


def test_chunk_may_not_exceed_chunk_tokens(kvz_bytes: bytes):
    preamble, _, entries, _ = split(kvz_bytes)
    header = KvzHeader(header_of(kvz_bytes) | {"chunk_tokens": 8})
    with pytest.raises(errors.ChunkIndexError, match="chunk 0 holds 16 tokens"):
        validate(header, entries, len(kvz_bytes), preamble.data_offset)


def test_reader_validates_the_index(kvz_bytes: bytes):
    entries = INDEX_RULES["overlapping entries"][0](split(kvz_bytes)[2])
    with pytest.raises(errors.ChunkIndexError, match="overlaps"):
        open_bytes(reseal(kvz_bytes, entries=entries))


def test_entry_past_end_of_file_is_truncation(kvz_bytes: bytes):
    entries = edit_entry(KV0, length=len(kvz_bytes))(split(kvz_bytes)[2])
    with pytest.raises(errors.TruncatedFileError, match="chunk 0 of level 'lossless'"):
        open_bytes(reseal(kvz_bytes, entries=entries))


@pytest.mark.parametrize(
    "patch", [(0, 3), (2, 1), (36, 1)], ids=["kind 3", "reserved u16", "reserved u32"]
)
def test_index_bytes_rules(kvz_bytes: bytes, patch: tuple[int, int]):
    at, value = patch
    index = bytearray(pack_index(split(kvz_bytes)[2]))
    index[40 + at] = value  # the second entry
    with pytest.raises(errors.ChunkIndexError):
        parse_index(bytes(index))


# --- header rules ----------------------------------------------------------------

REQUIRED = [
    "format",
    "model",
    "num_layers",
    "kv_heads",
    "head_dim",
    "dtype",
    "token_count",
    "chunk_tokens",
    "levels",
    "rope",
]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(kvz_bytes: bytes, field: str):
    header = header_of(kvz_bytes)
    del header[field]
    with pytest.raises(errors.HeaderError, match=f"'{field}' is missing"):
        open_bytes(reseal(kvz_bytes, header=header))


WRONG_FIELDS = {
    "format kvx": {"format": "kvx"},
    "num_layers string": {"num_layers": "2"},
    "num_layers bool": {"num_layers": True},
    "num_layers float": {"num_layers": 2.0},
    "kv_heads zero": {"kv_heads": 0},
    "head_dim negative": {"head_dim": -4},
    "dtype int8": {"dtype": "int8"},
    "token_count over cap": {"token_count": 1 << 25},
    "chunk over element cap": {"chunk_tokens": 1 << 30},
    "model not object": {"model": "sha256:x"},
    "fingerprint not string": {"model": {"fingerprint": 5}},
    "model name not string": {"model": {"fingerprint": "x", "name": 1}},
    "levels empty": {"levels": []},
    "level name not string": {"levels": [{"name": 1, "codec": {"id": "bytegroup-zstd"}}]},
    "level codec id missing": {"levels": [{"name": "a", "codec": {}}]},
    "level names repeat": {"levels": [LEVELS[0], LEVELS[0]]},
    "rope wrong length": {"rope": {"inv_freq": [1.0]}},
    "rope not numbers": {"rope": {"inv_freq": ["a", "b"]}},
}


@pytest.mark.parametrize("case", WRONG_FIELDS)
def test_wrong_field_types(case: str):
    fields = WRONG_FIELDS[case]
    with pytest.raises(errors.HeaderError, match=next(iter(fields))):
        parse_header(encode_header(make_header(**fields)))


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"format": "kvz"',
        b"\xff\xfe{}",
        b'{"format":"kvz","format":"kvz"}',
        b'{"x": NaN}',
        b"[" * 100_000,
        "\ufeff{}".encode(),
    ],
    ids=["not object", "not JSON", "not UTF-8", "duplicate key", "NaN", "deep nesting", "BOM"],
)
def test_header_must_be_strict_json(raw: bytes):
    with pytest.raises(errors.HeaderError):
        parse_header(raw)


def test_rope_frequencies_must_be_finite():
    text = json.dumps(make_header(rope={"inv_freq": [0.5, 1.0]})).replace("0.5", "1e400")
    with pytest.raises(errors.HeaderError, match=r"rope\.inv_freq"):
        parse_header(text.encode())  # json reads 1e400 as inf


DIGEST = "ab" * 32


def test_header_types_its_optional_fields_and_keeps_unknown_ones():
    header = parse_header(encode_header(make_header(
        created="2025-01-01", profile={"digest": DIGEST, "bytes": 10},
        chat={"prefix": "<u>", "separator": "\n", "suffix": "</u>"},
        source={"name": "doc.txt", "sha256": DIGEST}, future_field={"kept": [1, 2]})))
    assert header.created == "2025-01-01"
    assert header.profile == ProfileInfo(DIGEST, 10) and header.profile_bytes(DIGEST) == 10
    assert header.chat == ChatInfo("<u>", "\n", "</u>")
    assert header.source == SourceInfo("doc.txt", DIGEST)
    assert header.raw["future_field"] == {"kept": [1, 2]}
    assert header.profile_digests() == [DIGEST]
    plain = parse_header(encode_header(make_header()))
    assert (plain.chat, plain.profile, plain.source, plain.created) == (None, None, None, None)


@pytest.mark.parametrize("field, value, message", [
    ("chat", {"prefix": "a", "separator": "b"}, "chat.suffix' is missing"),
    ("chat", ["a", "b", "c"], "'chat' must be an object"),
    ("chat", {"prefix": 1, "separator": "b", "suffix": "c"}, "'chat.prefix' must be a string"),
    ("profile", {"digest": "p"}, "'profile.digest' must be a SHA-256"),
    ("profile", {"digest": DIGEST, "bytes": -1}, "'profile.bytes' must be a positive integer"),
    ("source", {"name": "x"}, "'source.sha256' is missing"),
    ("model", {"fingerprint": "f", "name": 7}, "'model.name' must be a string"),
    ("levels", [{"name": "x", "codec": {"id": "kvzip-profile", "profile": "../../etc"}}],
     r"'levels\[0\].codec.profile' must be a SHA-256"),
    ("created", 20250101, "'created' must be a string"),
])
def test_a_malformed_optional_field_is_a_header_error(field, value, message):
    """One line naming the field, never a TypeError from whoever reads it later."""
    with pytest.raises(errors.HeaderError, match=message):
        parse_header(encode_header(make_header(**{field: value})))


def test_new_header_builds_what_readers_parse():
    header = new_header(
        model={"fingerprint": "sha256:x", "name": "m"}, num_layers=2, kv_heads=1, head_dim=4,
        dtype="float32", token_count=5, chunk_tokens=4, levels=[("lossless", {"id": "bytegroup-zstd"})],
        rope_inv_freq=[1.0, 0.5], profile=ProfileInfo(DIGEST, None), chat=ChatInfo("a", "b", "c"))
    again = parse_header(encode_header(header.raw))
    assert again.raw == header.raw and again.chat == ChatInfo("a", "b", "c")
    assert header.raw["profile"] == {"digest": DIGEST}  # no "bytes": null
    with pytest.raises(errors.HeaderError, match="dtype"):
        new_header(model={"fingerprint": "f"}, num_layers=1, kv_heads=1, head_dim=2, dtype="int4",
                   token_count=1, chunk_tokens=1, levels=[("x", {"id": "y"})], rope_inv_freq=None)


def test_unknown_codec_id_fails_only_when_decoding(tmp_path: Path):
    levels = [LEVELS[0], {"name": "future", "codec": {"id": "no-such-codec", "q": 1}}]
    header = make_header("float16", levels=levels)
    path = write_kvz(tmp_path / "ctx.kvz", synthetic_kv("float16"), "float16", header)
    with open_cache(path) as reader:
        reader.decode_level("lossless")
        with pytest.raises(errors.UnknownCodecError, match="no-such-codec"):
            reader.decode_level("future")
        problems = reader.verify(decode=True)
        assert {p.entry.level for p in problems} == {1}
        assert len(problems) == 3


# --- sources and open_kvz --------------------------------------------------------


def test_checked_range():
    assert checked_range(2, 3, 5) == (2, 5)
    assert checked_range(5, 0, 5) == (5, 5)
    for offset, length in [(4, 2), (6, 0), (0, U64_MAX), (U64_MAX, U64_MAX)]:
        with pytest.raises(errors.TruncatedFileError):
            checked_range(offset, length, 5)
    with pytest.raises(ValueError):
        checked_range(-1, 1, 5)


def test_file_source_reads_ranges(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with FileSource(path) as source:
        assert source.size() == 10
        assert source.get_bytes(3, 4) == b"3456"
        with pytest.raises(errors.TruncatedFileError):
            source.get_bytes(8, 3)


def test_open_kvz_errors(tmp_path: Path):
    with pytest.raises(errors.InputError):
        open_kvz(tmp_path / "missing.kvz")
    with pytest.raises(errors.InputError):
        open_kvz(tmp_path)
    (tmp_path / "notes.txt").write_text("hello, this is not a kvz file")
    with pytest.raises(errors.BadMagicError):
        open_kvz(tmp_path / "notes.txt")


# --- writer ----------------------------------------------------------------------


def test_exception_inside_writer_leaves_target_and_no_temp_files(tmp_path: Path):
    target = tmp_path / "ctx.kvz"
    target.write_bytes(b"previous contents")
    with pytest.raises(RuntimeError), KvzWriter(target, make_header()) as writer:
        writer.add_kv(0, 0, 0, 16, b"payload")
        raise RuntimeError("encoder crashed")
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["ctx.kvz"]


def test_writer_without_commit_writes_nothing(tmp_path: Path):
    with KvzWriter(tmp_path / "ctx.kvz", make_header()) as writer:
        writer.add_kv(0, 0, 0, 16, b"payload")
    assert os.listdir(tmp_path) == []


def test_invalid_output_is_never_renamed(tmp_path: Path):
    target = tmp_path / "ctx.kvz"
    target.write_bytes(b"previous contents")
    with pytest.raises(errors.ChunkIndexError), KvzWriter(target, make_header()) as writer:
        writer.add_kv(0, 0, 0, 16, b"payload")  # chunks 1 and 2 and the token ids missing
        writer.commit()
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["ctx.kvz"]


def test_commit_replaces_target(tmp_path: Path):
    target = tmp_path / "ctx.kvz"
    target.write_bytes(b"previous contents")
    write_kvz(target, synthetic_kv("float32"), "float32")
    assert os.listdir(tmp_path) == ["ctx.kvz"]
    with open_cache(target) as reader:
        assert reader.verify(decode=True) == []


def test_writer_rejects_bad_header_before_creating_files(tmp_path: Path):
    with pytest.raises(errors.HeaderError, match="num_layers"):
        KvzWriter(tmp_path / "ctx.kvz", make_header(num_layers=0))
    with pytest.raises(errors.HeaderError, match="JSON"):
        KvzWriter(tmp_path / "ctx.kvz", make_header(created=object()))
    assert os.listdir(tmp_path) == []


def test_writer_into_missing_directory_is_an_input_error(tmp_path: Path):
    with pytest.raises(errors.InputError):
        KvzWriter(tmp_path / "no" / "ctx.kvz", make_header())


@pytest.mark.parametrize("ids", [[[1, 2]], [1.5], [-1], [1 << 32]])
def test_writer_rejects_bad_token_ids(tmp_path: Path, ids: list):
    with KvzWriter(tmp_path / "ctx.kvz", make_header()) as writer, pytest.raises(ValueError):
        writer.set_token_ids(ids)


# --- codecs that return float32 --------------------------------------------------


@register_codec
class Float32Passthrough(Codec):
    """A stand-in lossy codec: stores float32 values and decodes to float32."""

    codec_id = "test-float32-passthrough"

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, kv: np.ndarray, ctx: ChunkContext) -> bytes:
        return np.ascontiguousarray(kv, dtype="<f4").tobytes()

    def decode(self, payload: bytes, ctx: ChunkContext) -> np.ndarray:
        return np.frombuffer(payload, dtype="<f4").reshape(ctx.shape)


def test_float32_codec_output_is_cast_to_bfloat16_rounding_to_nearest_even(tmp_path: Path):
    bits = np.array(
        [0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF800000, 0x7FC00001, 0x00000001],
        dtype=np.uint32,
    )  # halfway->even, halfway->even (up), above half, overflow->inf, -inf, NaN, tiny
    expect = np.array([0x3F80, 0x3F82, 0x3F81, 0x7F80, 0xFF80, 0x7FC0, 0x0000], dtype=np.uint16)
    values = np.resize(bits.view(np.float32), (2, 1, 1, 1, 7)).reshape(2, 1, 1, 7, 1)
    header = make_header(
        "bfloat16",
        num_layers=1,
        kv_heads=1,
        head_dim=1,
        token_count=7,
        chunk_tokens=7,
        rope=None,
        levels=[{"name": "f32", "codec": {"id": Float32Passthrough.codec_id}}],
    )
    with KvzWriter(tmp_path / "ctx.kvz", header) as writer:
        writer.add_kv(0, 0, 0, 7, Float32Passthrough().encode(values, None))
        writer.set_token_ids(np.arange(7))
        writer.commit()
    with open_cache(tmp_path / "ctx.kvz") as reader:
        decoded = reader.decode_level("f32")
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded.reshape(2, 7)[0], expect)


# --- attack files ----------------------------------------------------------------


def attack_cases() -> list:
    expected = json.loads((ATTACKS / "expected.json").read_text(encoding="utf-8"))
    assert sorted(expected) == sorted(p.name for p in ATTACKS.glob("*.kvz"))
    cases = []
    for name, case in expected.items():
        cases.append(pytest.param(name, case["error"], id=name))
    return cases


@pytest.fixture
def memory_limit_256mib():
    """A fixed decode memory limit, so attack outcomes do not depend on this machine's RAM."""
    set_memory_limit(256 << 20)
    yield
    set_memory_limit(None)


@pytest.mark.parametrize("name, error", attack_cases())
def test_attack_file(name: str, error: str, memory_limit_256mib):
    tracemalloc.start()
    try:
        with pytest.raises(errors.KvzipError) as caught, open_cache(ATTACKS / name) as reader:
            reader.token_ids()
            reader.chunk_texts()
            for entry in reader.entries:  # in this process: no decode worker to translate errors
                if entry.kind is EntryKind.KV:
                    reader.decode_chunk(entry)
            for level in reader.header.level_names:
                reader.decode_level(level)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(caught.value).__name__ == error, caught.value
    assert peak < 16 << 20, f"peak allocation {peak} bytes"


def test_reading_and_decoding_a_file_needs_neither_torch_nor_the_model(tmp_path):
    """``kvzip.levels`` (and the importance rules) import without torch: a program that
    reads or decodes ``.kvz`` files, or serves them, does not pay for it (2.4 s here)."""
    import subprocess
    import sys

    fixtures = Path(__file__).parent / "fixtures"
    files = [str(fixtures / "v2" / "golden_irregular_f32.kvz"), str(fixtures / "v1" / "golden_lossy_f32.kvz")]
    code = (
        "import sys\n"
        "from kvzip.levels import open_cache\n"
        "import kvzip.importance.keep\n"
        f"for path in {files!r}:\n"
        "    with open_cache(path) as f:\n"
        "        kv = f.decode_layers(f.default_level())\n"
        "    assert all(layer.size for layer in kv.layers)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_loads_torch_only_for_commands_that_run_a_model():
    """``kvzip --help``, ``info`` and ``verify`` read files; they used to import torch
    first (2.4 s of a 2.8 s ``--help`` on the project's VM)."""
    import subprocess
    import sys

    golden = str(Path(__file__).parent / "fixtures" / "v2" / "golden_irregular_f32.kvz")
    code = (
        "import sys\n"
        "from kvzip.cli.app import app\n"
        f"for args in (['--help'], ['info', {golden!r}], ['verify', {golden!r}]):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, (args, stop.code)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr
