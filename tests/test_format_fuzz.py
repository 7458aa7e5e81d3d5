"""Hostile bytes: a mutated ``.kvz`` may be refused, but only with a ``KvzipError``,
and opening, verifying and decoding it must stay within a fixed memory budget."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fuzz.targets import reseal_kvz
from kvzip.errors import KvzipError
from kvzip.formats import BytesSource, parse_preamble
from kvzip.formats.spec import (
    INDEX_ENTRY_SIZE,
    MAGIC,
    PREAMBLE_SIZE,
    U32_MAX,
    U64_MAX,
)
from kvzip.levels import open_cache

SEED = (Path(__file__).parent / "fixtures" / "v1" / "golden_lossless_f32.kvz").read_bytes()
SEED_PREAMBLE = parse_preamble(SEED)
INDEX_START = PREAMBLE_SIZE + SEED_PREAMBLE.header_length
MEMORY_CAP = 64 << 20

# Where a u64/u32 overwrite hurts most: preamble lengths and offset, entries' fields.
FIELD_OFFSETS = [16, 24, 32, 40] + [
    INDEX_START + i * INDEX_ENTRY_SIZE + field
    for i in range(SEED_PREAMBLE.entry_count)
    for field in (4, 8, 12, 16, 24)
]
NASTY_VALUES = [0, 1, U32_MAX, 1 << 32, 1 << 63, U64_MAX, len(SEED), len(SEED) + 1]

positions = st.one_of(
    st.integers(len(MAGIC), PREAMBLE_SIZE - 1),  # tests/test_format.py covers the magic
    st.integers(PREAMBLE_SIZE, SEED_PREAMBLE.data_offset - 1),
    st.integers(0, len(SEED) - 1),
)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("splice"), positions, st.integers(0, 64), st.binary(max_size=64)),
    st.tuples(
        st.just("overwrite"),
        st.one_of(st.sampled_from(FIELD_OFFSETS), positions),
        st.sampled_from(NASTY_VALUES),
        st.sampled_from(["<I", "<Q"]),
    ),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, at, *args = mutation
    at = min(at, len(data))
    if kind == "flip":
        if at == len(data):
            return data
        return data[:at] + bytes([data[at] ^ (1 << args[0])]) + data[at + 1 :]
    if kind == "truncate":
        return data[:at]
    if kind == "splice":
        removed, inserted = args
        return data[:at] + inserted + data[at + removed :]
    value, fmt = args
    packed = struct.pack(fmt, value & (U32_MAX if fmt == "<I" else U64_MAX))
    return data[:at] + packed + data[at + len(packed) :]


def open_and_decode_everything(data: bytes) -> None:
    """Everything a user can ask of a file; KvzipErrors are the allowed outcome."""
    try:
        reader = open_cache(BytesSource(data))
    except KvzipError as exc:
        event(f"refused on open: {type(exc).__name__}")
        return
    problems = reader.verify(decode=True)
    event(f"opened, {'with' if problems else 'no'} problems")
    calls = [reader.token_ids, reader.chunk_texts]
    calls += [lambda name=name: reader.decode_level(name) for name in reader.header.level_names]
    for call in calls:
        with contextlib.suppress(KvzipError):
            call()


def test_seed_file_is_valid():
    reader = open_cache(BytesSource(SEED))
    assert reader.verify(decode=True) == []
    assert reader.chunk_texts() is not None
    assert len(reader.header.levels) == 2


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutation_list=st.lists(mutations, min_size=1, max_size=3), fix_checksums=st.booleans())
def test_mutated_file_fails_cleanly_in_bounded_memory(mutation_list: list, fix_checksums: bool):
    data = SEED
    for mutation in mutation_list:
        data = mutate(data, mutation)
    if fix_checksums:
        data = reseal_kvz(data)
    tracemalloc.start()  # only around the code under test: tracing slows hypothesis too
    try:
        open_and_decode_everything(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_CAP, f"peak allocation {peak} bytes"
