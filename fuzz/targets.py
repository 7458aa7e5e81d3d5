"""The fuzz targets: what each one hands untrusted bytes to.

A target is set up once per process (``Target.setup()`` returns the one-input
function) and then called with every input.  The one-input function returns
normally when kvzip either accepted the input or refused it with a
``KvzipError``; any other exception escapes, and is the finding.  It does not
depend on atheris, so ``tests/test_fuzz_smoke.py`` replays corpora and
regression files through the very same functions.

kvzip is imported inside ``setup()`` only: ``fuzz.harness`` wraps the call in
atheris's import instrumentation, so kvzip's modules are instrumented for
coverage as they load.

Targets (inputs are the bytes of ...):

``container``            a whole ``.kvz`` (open, verify with decode, token ids, texts,
                         every level decoded), as given and with every checksum it
                         declares recomputed, so mutations reach the rules behind them
``payload-<codec>``      one KV payload of that codec, decoded as each chunk of a golden
                         file's level (lossy frames get their CRC resealed)
``entropy-<layout>``     one entropy-coded block of that layout, its side info stored
                         *uncompressed* after a ``<HH`` (groups, tokens) shape: the
                         harness zstd-compresses it, so mutations reach the side-info
                         rules instead of dying in zstd
``rans-c``               a call of one of ``kvzip.codecs._rans``'s C entry points with
                         arbitrary buffers and sizes (encoding: :func:`decode_c_call`)
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "v1"
PROFILES = GOLDEN / "profiles"
CORPUS = Path(__file__).resolve().parent / "corpus"
DICTS = Path(__file__).resolve().parent / "dicts"

OneInput = Callable[[bytes], None]


def _no_feedback(key: str) -> None:
    pass


# What an input led to, as a short key; ``fuzz.harness`` turns each distinct key into a
# coverage feature, so inputs that reach a new refusal (or a new outcome of a C call,
# whose code atheris cannot see without a clang build) are kept in the corpus.
feedback: Callable[[str], None] = _no_feedback
# numbers (decimal or hex) and quoted text: what a message repeats from the input
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|-?\b(?:0x[0-9a-f]+|[0-9a-f]*\d[0-9a-f]*|[a-f]{8})\b")


def outcome(message: str) -> str:
    """A message without what it quotes from the input, so that one kind of refusal is one
    feature (and the corpus does not fill with files that differ in a checksum)."""
    return _VARIABLE.sub("#", message)[:120]


def refused(exc: BaseException, where: str = "") -> None:
    """An allowed refusal: tell the fuzzer which one."""
    feedback(f"{where}{type(exc).__name__}:{outcome(str(exc))}")


@dataclass(frozen=True)
class Target:
    name: str
    doc: str
    setup: Callable[[], OneInput]
    max_len: int  # libFuzzer's -max_len: the largest seed, with room to grow

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name

    @property
    def dictionary(self) -> Path | None:
        path = DICTS / f"{self.name}.dict"
        return path if path.is_file() else None


# --- helpers shared by targets and corpus ------------------------------------------


def reseal_kvz(data: bytes) -> bytes:
    """``data`` with every checksum it declares recomputed where its bounds allow
    (header, index, each payload), so a mutation reaches the rule behind them."""
    from kvzip.formats.spec import INDEX_ENTRY, INDEX_ENTRY_SIZE, PREAMBLE, PREAMBLE_SIZE

    if len(data) < PREAMBLE_SIZE:
        return data
    buf = bytearray(data)
    header_length, index_length = PREAMBLE.unpack_from(buf)[4:6]
    index_start = PREAMBLE_SIZE + header_length
    index_end = index_start + index_length
    if index_end > len(buf) or index_length % INDEX_ENTRY_SIZE:
        return data
    for at in range(index_start, index_end, INDEX_ENTRY_SIZE):
        offset, length = INDEX_ENTRY.unpack_from(buf, at)[6:8]
        if offset + length <= len(buf):
            struct.pack_into("<I", buf, at + 32, zlib.crc32(buf[offset : offset + length]))
    struct.pack_into("<II", buf, 32, zlib.crc32(buf[PREAMBLE_SIZE:index_start]),
                     zlib.crc32(buf[index_start:index_end]))
    return bytes(buf)


def reseal_frame(payload: bytes) -> bytes:
    """A lossy payload frame (``<BII`` version, crc32 of the rest, section count) with
    its CRC recomputed; anything too short to have one is returned as it is."""
    if len(payload) < 9:
        return payload
    buf = bytearray(payload)
    struct.pack_into("<I", buf, 1, zlib.crc32(buf[9:]))
    return bytes(buf)


_BLOCK_HEAD = struct.Struct("<II")  # side-info length, code words (kvzip/codecs/entropy.py)
_SHAPE = struct.Struct("<HH")
MAX_GROUPS, MAX_TOKENS = 4096, 1024  # entropy targets: shapes a real chunk can have


def entropy_input_to_block(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """An ``entropy-*`` input -> (a real entropy block, its shape)."""
    import zstandard

    if len(data) < _SHAPE.size + _BLOCK_HEAD.size:
        return data[_SHAPE.size :], (1, 1)
    g, n = _SHAPE.unpack_from(data)
    shape = (g % (MAX_GROUPS + 1), n % (MAX_TOKENS + 1))
    side_len, nwords = _BLOCK_HEAD.unpack_from(data, _SHAPE.size)
    start = _SHAPE.size + _BLOCK_HEAD.size
    side = zstandard.ZstdCompressor(level=1).compress(data[start : start + side_len])
    return _BLOCK_HEAD.pack(len(side), nwords) + side + data[start + side_len :], shape


def block_to_entropy_input(block: bytes, shape: tuple[int, int]) -> bytes:
    """The inverse of :func:`entropy_input_to_block` (for seeds)."""
    import zstandard

    side_len, nwords = _BLOCK_HEAD.unpack_from(block)
    side = zstandard.ZstdDecompressor().decompress(block[8 : 8 + side_len])
    return _SHAPE.pack(*shape) + _BLOCK_HEAD.pack(len(side), nwords) + side + block[8 + side_len :]


# --- rans-c: calls of the C entry points ----------------------------------------------
# An input is: u8 function (mod 4), then each argument in order:
#   read-only buffer: u32 length, then that many bytes (fewer if the input ends);
#                     length 0xFFFFFFFF = the encoder's own constant table, where the
#                     argument has one (fit_param's powers, gg, lgg), else empty
#   writable buffer:  u32 length (a bytearray of min(length, 4 MiB) zero bytes)
#   n:                i64 (zero-padded if the input ends)
C_FUNCTIONS = {
    "decode": "rrrrrwn",  # words, freqs, params, rows, center, out, n
    "encode": "rrrrrn",  # matrix, freqs, params, rows, center, n
    "row_histograms": "rrrrwn",  # matrix, rows, lo, offs, counts, n
    "fit_param": "rrrrrrrrwwwn",  # counts, lo, offs, betas, powers, gg, lgg, s_fixed, mu4, sidx, shape, n
}
C_FUNCTION_NAMES = list(C_FUNCTIONS)
DEFAULT_TABLE = 0xFFFFFFFF
MAX_WRITABLE = 4 << 20


def _constant_tables() -> dict[tuple[str, int], bytes]:
    from kvzip.codecs import entropy as E

    return {("fit_param", 4): E._POWERS.tobytes(), ("fit_param", 5): E._GG_F.tobytes(),
            ("fit_param", 6): E._LOG2_GG.tobytes()}


def decode_c_call(data: bytes, tables: dict[tuple[str, int], bytes]) -> tuple[str, list]:
    """A ``rans-c`` input -> (function name, arguments)."""
    name = C_FUNCTION_NAMES[data[0] % len(C_FUNCTION_NAMES)] if data else "decode"
    pos, args = 1, []
    for i, kind in enumerate(C_FUNCTIONS[name]):
        if kind == "n":
            args.append(int.from_bytes(data[pos : pos + 8].ljust(8, b"\0"), "little", signed=True))
            pos += 8
            continue
        length = int.from_bytes(data[pos : pos + 4].ljust(4, b"\0"), "little")
        pos += 4
        if kind == "w":
            args.append(bytearray(min(length, MAX_WRITABLE)))
        elif length == DEFAULT_TABLE:
            args.append(tables.get((name, i), b""))
        else:
            args.append(data[pos : pos + length])
            pos += length
    return name, args


def encode_c_call(name: str, args: list, tables: dict[tuple[str, int], bytes]) -> bytes:
    """The inverse of :func:`decode_c_call` (for seeds): ``args`` as the call saw them."""
    out = bytearray([C_FUNCTION_NAMES.index(name)])
    for i, (kind, arg) in enumerate(zip(C_FUNCTIONS[name], args)):
        if kind == "n":
            out += int(arg).to_bytes(8, "little", signed=True)
            continue
        raw = bytes(memoryview(arg).cast("B"))
        if kind == "w":
            out += len(raw).to_bytes(4, "little")
        elif tables.get((name, i)) == raw:
            out += DEFAULT_TABLE.to_bytes(4, "little")
        else:
            out += len(raw).to_bytes(4, "little") + raw
    return bytes(out)


# --- the targets ----------------------------------------------------------------------


def _setup_container() -> OneInput:
    from kvzip.errors import KvzipError
    from kvzip.formats import BytesSource
    from kvzip.levels import open_cache

    def one(data: bytes) -> None:
        for candidate in dict.fromkeys([data, reseal_kvz(data)]):
            try:
                reader = open_cache(BytesSource(candidate))
            except KvzipError as exc:
                refused(exc, "open:")
                continue
            for problem in reader.verify(decode=True):  # KvzipErrors, reported as problems
                feedback(f"verify:{outcome(problem.message)}")
            calls = [reader.token_ids, reader.chunk_texts]
            # decoders=1: on this thread only
            calls += [lambda n=n, reader=reader: reader.decode_layers(n, decoders=1) for n in reader.header.level_names]
            for call in calls:
                try:
                    call()
                except KvzipError as exc:
                    refused(exc)

    return one


GOLDEN_V2 = ROOT / "tests" / "fixtures" / "v2"
# (layers, heads, tokens) of the layout target: the v2 golden files' geometry
LAYOUT_GEOMETRY = (6, 2, 45)


def _setup_layout() -> OneInput:
    import numpy as np

    from kvzip.errors import KvzipError
    from kvzip.formats import PositionLayout

    def one(data: bytes) -> None:
        try:
            layout = PositionLayout.from_bytes(data, *LAYOUT_GEOMETRY)
        except KvzipError as exc:
            refused(exc)
            return
        feedback("parsed")
        for start in range(0, LAYOUT_GEOMETRY[2], 16):  # what a reader asks of a layout
            layout.blocks(start, start + 16)
            layout.chunk_stored(start, start + 16)
        again = layout.to_bytes()  # the writer's encoding of what was read reads back the same
        back = PositionLayout.from_bytes(again, *LAYOUT_GEOMETRY)
        if any(not np.array_equal(x, y) for a, b in zip(layout, back) for x, y in zip(a, b)):
            raise AssertionError("a parsed layout does not survive its own encoding")

    return one


# payload target -> (golden file, level) whose codec config and chunk contexts it uses
PAYLOADS: dict[str, list[tuple[str, str]]] = {
    "payload-lossless": [("golden_lossless_f32.kvz", "lossless"), ("golden_lossless_f16.kvz", "lossless"),
                         ("golden_lossless_bf16.kvz", "lossless")],
    "payload-cachegen": [("golden_lossy_f32.kvz", "cachegen")],
    "payload-lossy-param": [("golden_lossy_f32.kvz", "balanced")],
    "payload-lossy-param2": [("golden_profile_f32.kvz", "balanced-uncal")],
    "payload-lossy-rans": [("golden_profile_rans_f32.kvz", "balanced-uncal")],
    "payload-profile-param2": [("golden_profile_f32.kvz", "balanced")],
    "payload-profile-rans": [("golden_profile_rans_f32.kvz", "balanced")],
}


def register_golden_profiles() -> None:
    """Make the golden files' calibration profile findable (the profile codec needs it)."""
    from kvzip.levels import register_profile_file

    for path in sorted(PROFILES.glob("*.kvzprofile")):
        register_profile_file(path)


def payload_contexts(target: str):
    """[(LevelCodecs, KV entry, lossy?)] for every chunk of a payload target's levels."""
    from kvzip.codecs.stages import StagedCodec
    from kvzip.formats import open_kvz
    from kvzip.levels import LevelCodecs

    register_golden_profiles()
    out = []
    for file, level in PAYLOADS[target]:
        with open_kvz(GOLDEN / file) as reader:
            decoder = LevelCodecs(reader.header)
            lossy = isinstance(decoder.codec(reader.header.level_index(level)), StagedCodec)
            # every chunk: they differ in length and in holding the attention sinks or not
            out += [(decoder, e, lossy) for e in reader.kv_entries(level)]
    return out


def _setup_payload(target: str) -> Callable[[], OneInput]:
    def setup() -> OneInput:
        from kvzip.errors import KvzipError

        contexts = payload_contexts(target)

        def one(data: bytes) -> None:
            for decoder, entry, lossy in contexts:
                try:
                    decoder.decode(entry, reseal_frame(data) if lossy else data)
                    feedback(f"decoded:{entry.chunk}")
                except KvzipError as exc:
                    refused(exc)

        return one

    return setup


ENTROPY_LAYOUTS = ("param", "param2", "rans", "hist")


def _setup_entropy(layout: str) -> Callable[[], OneInput]:
    def setup() -> OneInput:
        import numpy as np

        from kvzip.codecs.entropy import RangeCoder
        from kvzip.errors import KvzipError

        coder = RangeCoder(layout)

        def one(data: bytes) -> None:
            block, shape = entropy_input_to_block(data)
            try:
                out = coder.decode(block, shape)
            except KvzipError as exc:
                refused(exc)
                return
            if out.shape != shape or out.dtype != np.int32:
                raise AssertionError(f"decoded {out.dtype} {out.shape}, asked for int32 {shape}")
            feedback("decoded")

        return one

    return setup


def _setup_rans_c() -> OneInput:
    from kvzip.codecs import _rans

    tables = _constant_tables()

    def one(data: bytes) -> None:
        name, args = decode_c_call(data, tables)
        try:
            getattr(_rans, name)(*args)
        except ValueError as exc:  # the entry points' own refusal
            refused(exc, f"{name}:")
            return
        feedback(f"{name}:ok")

    return one


TARGETS: dict[str, Target] = {}


def _add(name: str, doc: str, setup: Callable[[], OneInput], max_len: int) -> None:
    TARGETS[name] = Target(name, doc, setup, max_len)


_add("container", "a whole .kvz: open, verify, decode everything (checksums as given and resealed)",
     _setup_container, 32 << 10)
for _name, _uses in PAYLOADS.items():
    _file, _level = _uses[0]
    _add(_name, f"one KV payload, decoded as each chunk of level {_level!r} of {_file}", _setup_payload(_name),
         16 << 10)
for _layout in ENTROPY_LAYOUTS:
    _add(f"entropy-{_layout}", f"one {_layout!r} entropy block, side info uncompressed", _setup_entropy(_layout),
         16 << 10)
_add("rans-c", "kvzip.codecs._rans's C entry points called with arbitrary buffers and sizes", _setup_rans_c,
     16 << 10)
_add("layout", "a 2.x header's position layout (kvz-positions/1, decompressed), for 6 layers x 2 heads x 45 tokens",
     _setup_layout, 4 << 10)


def select(spec: str) -> list[Target]:
    """``all`` or a comma-separated list of target names (a trailing ``*`` matches a prefix)."""
    if spec == "all":
        return list(TARGETS.values())
    chosen: list[Target] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matches = [t for n, t in TARGETS.items() if n == part or (part.endswith("*") and n.startswith(part[:-1]))]
        if not matches:
            raise SystemExit(f"unknown fuzz target {part!r} (targets: {', '.join(TARGETS)})")
        chosen += [t for t in matches if t not in chosen]
    return chosen


def environment() -> dict[str, str]:
    """What a harness process needs in its environment besides the caller's."""
    return {"KVZIP_PROFILE_DIR": str(PROFILES), "KVZIP_DECODE_WORKERS": "1", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
