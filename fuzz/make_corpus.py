"""Derive the seed corpus ``fuzz/corpus/<target>/`` from the v1 golden files.

Deterministic: running it again writes the same files (``tests/test_fuzz_smoke.py``
checks that the committed corpus is what this writes).  Seeds are valid inputs, so
every mutation starts from something kvzip accepts:

* ``container``: the lossless golden files;
* ``payload-*``: each KV payload of the target's golden level;
* ``entropy-*``: the entropy blocks inside those payloads (and the other levels of the
  same layout), side info uncompressed;
* ``rans-c``: the C entry points' arguments as kvzip itself passes them, recorded while
  decoding a golden ``rans`` chunk and encoding two small matrices.

    python -m fuzz.make_corpus          (from the repository root, with kvzip importable)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from fuzz import targets as T

MAX_ENTROPY_SEEDS = 8
MAX_RANS_C_SEEDS_PER_FUNCTION = 3
MAX_RANS_C_SEED_BYTES = 12 << 10  # a wide matrix's histograms would take hundreds of KB


def container_seeds() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(T.GOLDEN.glob("golden_lossless_*.kvz"))}


def payload_seeds(target: str) -> dict[str, bytes]:
    from kvzip.formats import open_kvz

    seeds = {}
    for file, level in T.PAYLOADS[target]:
        with open_kvz(T.GOLDEN / file) as reader:
            for entry in reader.kv_entries(level):
                seeds[f"{Path(file).stem}.{level}.chunk{entry.chunk}"] = reader.read_payload(entry)
    return seeds


# entropy layout -> golden files whose lossy levels use it
ENTROPY_SOURCES = {
    "param": ["golden_lossy_f32.kvz"],
    "param2": ["golden_profile_f32.kvz"],
    "rans": ["golden_profile_rans_f32.kvz"],
    "hist": ["golden_lossy_f32.kvz"],
}


def entropy_seeds(layout: str) -> dict[str, bytes]:
    from kvzip.codecs.stages import StagedCodec, unpack_sections
    from kvzip.formats import open_kvz
    from kvzip.levels import LevelCodecs

    found = {}
    for file in ENTROPY_SOURCES[layout]:
        with open_kvz(T.GOLDEN / file) as reader:
            decoder = LevelCodecs(reader.header)
            for li, level in enumerate(reader.header.levels):
                codec = decoder.codec(li)
                if not isinstance(codec, StagedCodec):
                    continue
                for entry in reader.kv_entries(level.name):
                    ctx = decoder.context(entry)
                    pipe = codec.pipeline_for(ctx)
                    if pipe.coder.family != layout:
                        continue
                    shapes = pipe.quantizer.symbol_shapes(ctx)
                    sections = unpack_sections(reader.read_payload(entry), 1 + len(shapes))
                    for i, (block, shape) in enumerate(zip(sections[1:], shapes)):
                        name = f"{Path(file).stem}.{level.name}.chunk{entry.chunk}.block{i}"
                        found[name] = T.block_to_entropy_input(block, shape)
    # the smallest few: quick to run, and together they still hold every kind of block
    keep = sorted(found, key=lambda k: (len(found[k]), k))[:MAX_ENTROPY_SEEDS]
    return {k: found[k] for k in sorted(keep)}


class _Recorder:
    """Stands in for ``kvzip.codecs._rans`` and records every call's arguments."""

    def __init__(self, real):
        self._real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        if name not in T.C_FUNCTIONS:
            return fn

        def call(*args):
            copies = [a if isinstance(a, int) else bytes(memoryview(a).cast("B")) for a in args]
            result = fn(*args)
            self.calls.append((name, copies))
            return result

        return call


def rans_c_seeds() -> dict[str, bytes]:
    import numpy as np

    from kvzip.codecs import entropy as E
    from kvzip.codecs.entropy import _common, rans
    from kvzip.levels import open_cache

    holders = (_common, rans)  # the entropy modules that call kvzip.codecs._rans
    recorder = _Recorder(_common._rans)
    for mod in holders:
        mod._rans = recorder
    try:
        with open_cache(T.GOLDEN / "golden_profile_rans_f32.kvz") as reader:
            entries = reader.kv_entries("balanced")
            reader.decode_chunk(entries[-1])  # the short last chunk: small calls
        rng = np.random.default_rng(12)
        coder = E.RangeCoder("rans")
        narrow = np.rint(rng.standard_normal((6, 11)) * 3).astype(np.int64)
        narrow[2] = 5  # a constant row
        medium = np.rint(rng.standard_normal((5, 8)) * 40).astype(np.int64)
        wide = np.rint(rng.standard_normal((3, 7)) * 3000).astype(np.int64)  # raw low bits > 0
        for m in (narrow, medium, wide):
            coder.decode(coder.encode(m), m.shape)
    finally:
        for mod in holders:
            mod._rans = recorder._real
    tables = T._constant_tables()
    seeds, per_function = {}, {}
    for name, args in recorder.calls:
        k = per_function.get(name, 0)
        data = T.encode_c_call(name, args, tables)
        if k >= MAX_RANS_C_SEEDS_PER_FUNCTION or len(data) > MAX_RANS_C_SEED_BYTES:
            continue
        per_function[name] = k + 1
        seeds[f"{name}.{k}"] = data
    return seeds


def layout_seeds() -> dict[str, bytes]:
    """The v2 golden files' position layouts (a window, an irregular per-head subset)."""
    from kvzip.formats import open_kvz

    seeds = {}
    for path in sorted(T.GOLDEN_V2.glob("golden_*.kvz")):
        with open_kvz(path) as reader:
            seeds[path.stem] = reader.header.layout.to_bytes()
    return seeds


def seeds_for(target: str) -> dict[str, bytes]:
    if target == "container":
        return container_seeds()
    if target in T.PAYLOADS:
        return payload_seeds(target)
    if target.startswith("entropy-"):
        return entropy_seeds(target.removeprefix("entropy-"))
    if target == "rans-c":
        return rans_c_seeds()
    if target == "layout":
        return layout_seeds()
    raise KeyError(target)


def all_seeds() -> dict[str, dict[str, bytes]]:
    T.register_golden_profiles()
    return {name: seeds_for(name) for name in T.TARGETS}


def write(corpus: Path = T.CORPUS) -> None:
    for target, seeds in all_seeds().items():
        out = corpus / target
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name, data in seeds.items():
            (out / name).write_bytes(data)
        print(f"{target:24} {len(seeds):3} seeds, {sum(map(len, seeds.values())):7} bytes", file=sys.stderr)


if __name__ == "__main__":
    write()
