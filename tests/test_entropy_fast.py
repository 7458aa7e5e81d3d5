"""The ``param2`` entropy layout (symbol pairs, raw low bits, ANS): exact round
trips on random and skewed data with narrow and wide spans, the codec's error
bound through KvzipLossyCodec, and corrupt payloads refused with CodecError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard

from kvzip.codecs import ChunkContext, codec_from_config
from kvzip.codecs import entropy as E
from kvzip.codecs.entropy import entropy_layout
from kvzip.codecs.entropy import param2 as P2
from kvzip.codecs.transforms import UnRoPE, rope_cos_sin, rotate
from kvzip.errors import CodecError
from kvzip.levels import LEVELS

L, H, D = 3, 2, 16
INV_FREQ = tuple((1.0 / (10000.0 ** (np.arange(0, D, 2) / D))).tolist())


def _side(data: bytes) -> tuple[bytes, int]:
    side_len, nwords = E._HEAD.unpack_from(data, 0)
    return zstandard.ZstdDecompressor().decompress(data[E._HEAD.size : E._HEAD.size + side_len]), nwords


def _layout(data: bytes, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(span, raw, tup) per cluster of a param2 block."""
    raw, _ = _side(data)
    nc = struct.unpack_from("<I", raw, 0)[0]
    pos = 4 + 6 * g
    span = np.frombuffer(raw, "<i4", nc, pos + 7 * nc)
    return span, np.frombuffer(raw, np.uint8, nc, pos + 11 * nc), np.frombuffer(raw, np.uint8, nc, pos + 12 * nc)


def _rebuild(data: bytes, side: bytes, tail: bytes | None = None) -> bytes:
    """A block with new side info (and optionally new words + planes)."""
    side_len, nwords = E._HEAD.unpack_from(data, 0)
    rest = data[E._HEAD.size + side_len :] if tail is None else tail
    comp = zstandard.ZstdCompressor().compress(side)
    return E._HEAD.pack(len(comp), nwords) + comp + rest


def _matrix(kind: str, seed: int, g: int = 40, n: int = 65) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = {"narrow": 1.0, "wide": 40.0, "huge": 600.0}
    if kind.startswith("random"):
        s = scale[kind.split("-")[1]]
        m = rng.integers(-int(s) - 1, int(s) + 2, (g, n))
    else:  # skewed: heavy tails, per-row means and scales, outliers, constant rows
        s = scale[kind.split("-")[1]]
        sig = s * np.exp(rng.normal(0, 0.5, g))[:, None]
        m = np.rint(rng.laplace(0, 1, (g, n)) * sig + rng.normal(0, 3 * s, g)[:, None])
        m[1] = 7
        m[2, n // 2] += 40 * s
    return m.astype(np.int32)


KINDS = ["random-narrow", "random-wide", "skewed-narrow", "skewed-wide", "skewed-huge"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 65, 256])
def test_param2_roundtrip_exact(kind, n):
    m = _matrix(kind, seed=n, n=n)
    coder = entropy_layout("param2")
    data = coder.encode(m)
    assert data == coder.encode(m.copy())  # deterministic
    out = coder.decode(data, m.shape)
    assert out.dtype == np.int32 and np.array_equal(out, m)
    # The fresh model cache decodes the same (models are rebuilt, not remembered).
    E.clear_model_caches()
    assert np.array_equal(entropy_layout("param2").decode(data, m.shape), m)


def test_param2_uses_pairs_and_raw_bits_and_costs_little():
    """Wide spans take raw low bits, narrow ones pairs; bits within 0.5% of 'param'."""
    rng = np.random.default_rng(7)
    g, n = 600, 255  # odd n: pair clusters end with a single symbol
    sig = np.exp(rng.uniform(0, np.log(200), g))[:, None]
    m = np.rint(rng.normal(0, 1, (g, n)) * sig + rng.normal(0, 5, g)[:, None]).astype(np.int32)
    a, b = entropy_layout("param").encode(m), entropy_layout("param2").encode(m)
    assert np.array_equal(entropy_layout("param2").decode(b, m.shape), m)
    span, raw, tup = _layout(b, g)
    assert (raw > 0).any() and (raw == 0).any()
    assert (tup == 2).any()
    span_h = ((span.astype(np.int64) - 1) >> raw) + 1
    assert (span_h[tup > 1] ** 2 <= P2.MAX_ALPHA).all()
    assert len(b) <= 1.005 * len(a)


def test_param2_all_constant_and_empty():
    coder = entropy_layout("param2")
    m = np.full((5, 9), -3, np.int32)
    assert np.array_equal(coder.decode(coder.encode(m), m.shape), m)
    e = np.zeros((0, 4), np.int32)
    assert coder.decode(coder.encode(e), e.shape).shape == (0, 4)


def test_param_bitstream_unchanged_by_param2():
    """'param' still writes (and reads) its own layout: no raw/tup bytes, no planes."""
    m = _matrix("skewed-wide", 3)
    data = entropy_layout("param").encode(m)
    side, nwords = _side(data)
    nc = struct.unpack_from("<I", side, 0)[0]
    assert len(side) == 4 + 6 * m.shape[0] + 11 * nc
    assert np.array_equal(entropy_layout("param").decode(data, m.shape), m)
    with pytest.raises(CodecError):  # the layouts are not interchangeable
        entropy_layout("param").decode(entropy_layout("param2").encode(m), m.shape)


# ---- through the codec ---------------------------------------------------------------
def _ctx(start: int, n: int) -> ChunkContext:
    return ChunkContext(start, n, L, H, D, "float32", INV_FREQ)


def _kv(start: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pre = rng.normal(0, 2, (L, H, 1, D)) + np.exp(rng.normal(0, 0.7, (L, H, 1, D))) * rng.normal(0, 1, (L, H, n, D))
    cos, sin = rope_cos_sin(_ctx(start, n))
    keys = rotate(pre.astype(np.float32), cos, sin, +1.0)
    return np.stack([keys, rng.laplace(0, 0.5, (L, H, n, D)).astype(np.float32)])


@pytest.mark.parametrize("level,key_step", [("high", None), ("balanced", None), ("small", None), ("high", 0.01)])
def test_param2_error_bound_through_codec(level, key_step):
    cfg = {**LEVELS[level], "entropy": "param2"}
    if key_step:
        cfg["key_step"] = key_step  # wide spans: raw low bits in play
    codec = codec_from_config(cfg)
    ref = codec_from_config({**cfg, "entropy": "param"})
    for start in (0, 128):
        ctx = _ctx(start, 64)
        kv = _kv(start, 64, seed=start + 1)
        out = codec.decode(codec.encode(kv, ctx), ctx)
        # The entropy layer is lossless: the same reconstruction as "param".
        assert np.array_equal(out, ref.decode(ref.encode(kv, ctx), ctx))
        a, b = UnRoPE().forward(kv, ctx), UnRoPE().forward(out, ctx)
        ns = max(0, cfg["sink_tokens"] - start)
        for kvi, rel in ((0, cfg["key_step"]), (1, cfg["value_step"])):
            rms = np.sqrt(np.mean(a[kvi][:, :, ns:].astype(np.float64) ** 2, axis=(1, 2, 3)))
            bound = (rel * rms / 2)[:, None, None, None]
            if kvi == 1:
                rms_t = np.sqrt(np.mean(a[1].astype(np.float64) ** 2, axis=(1, 3)))
                code = np.clip(np.rint(4 * np.log2(rms_t / rms[:, None])), -127, 127)
                bound = bound * (2.0 ** (code * 0.25 * cfg["value_token_exp"]))[:, None, :, None]
            bound = bound * (1 + 1e-4) + 1e-5
            assert (np.abs(a[kvi] - b[kvi])[:, :, ns:] <= bound[:, :, ns:] if bound.shape[2] > 1
                    else np.abs(a[kvi] - b[kvi])[:, :, ns:] <= bound).all()
            if ns:
                sb = bound[:, :, :ns] if bound.shape[2] > 1 else bound
                assert (np.abs(a[kvi] - b[kvi])[:, :, :ns] <= sb / cfg["sink_factor"] + 1e-5).all()


def test_codec_accepts_param2_and_rejects_unknown():
    assert codec_from_config({**LEVELS["balanced"], "entropy": "param2"}).params()["entropy"] == "param2"
    for bad in ("param3", 2, None):
        with pytest.raises(CodecError):
            codec_from_config({**LEVELS["balanced"], "entropy": bad})


# ---- corrupt input -------------------------------------------------------------------
@pytest.fixture(scope="module")
def block():
    m = _matrix("skewed-wide", 11, g=60, n=64)
    m[:30] = _matrix("skewed-narrow", 12, g=30, n=64)
    data = entropy_layout("param2").encode(m)
    span, raw, tup = _layout(data, m.shape[0])
    assert (raw > 0).any() and (tup == 2).any()
    return m, data


def _edit_cluster_byte(data: bytes, g: int, col: int, value: int, which: int = 0) -> bytes:
    side, _ = _side(data)
    nc = struct.unpack_from("<I", side, 0)[0]
    b = bytearray(side)
    b[4 + 6 * g + col * nc + which] = value
    return _rebuild(data, bytes(b))


@pytest.mark.parametrize("edit", ["raw", "tup0", "tup9", "alpha", "frac", "shape", "cid", "span0", "size"])
def test_param2_invalid_side_info(block, edit):
    m, data = block
    g = m.shape[0]
    side, _ = _side(data)
    nc = struct.unpack_from("<I", side, 0)[0]
    pos = 4 + 6 * g
    if edit == "raw":
        bad = _edit_cluster_byte(data, g, 11, P2.MAX_RAW + 1)
    elif edit == "tup0":
        bad = _edit_cluster_byte(data, g, 12, 0)
    elif edit == "tup9":
        bad = _edit_cluster_byte(data, g, 12, 9)
    elif edit == "alpha":  # a tuple alphabet past MAX_ALPHA
        b = bytearray(side)
        struct.pack_into("<i", b, pos + 7 * nc, 5000)
        b[pos + 11 * nc] = 0
        b[pos + 12 * nc] = 2
        bad = _rebuild(data, bytes(b))
    elif edit == "frac":
        bad = _edit_cluster_byte(data, g, 0, 4)
    elif edit == "shape":
        bad = _edit_cluster_byte(data, g, 2, len(E.BETAS))
    elif edit == "cid":
        b = bytearray(side)
        struct.pack_into("<H", b, 4 + 4 * g, nc + 3)
        bad = _rebuild(data, bytes(b))
    elif edit == "span0":
        b = bytearray(side)
        struct.pack_into("<i", b, pos + 7 * nc, 0)
        bad = _rebuild(data, bytes(b))
    else:
        bad = _rebuild(data, side + b"\0")
    with pytest.raises(CodecError):
        entropy_layout("param2").decode(bad, m.shape)


def test_param2_plane_length_checked(block):
    m, data = block
    for bad in (data[:-1], data + b"\0", data[:-4]):
        with pytest.raises(CodecError):
            entropy_layout("param2").decode(bad, m.shape)


def test_param2_truncations_and_garbage(block):
    m, data = block
    coder = entropy_layout("param2")
    for cut in (0, 3, 8, 12, len(data) // 2):
        with pytest.raises(CodecError):
            coder.decode(data[:cut], m.shape)
    rng = np.random.default_rng(0)
    for _ in range(20):
        with pytest.raises(CodecError):
            coder.decode(rng.bytes(rng.integers(1, 300)), m.shape)
    with pytest.raises(CodecError):  # header claims more words than there are
        coder.decode(E._HEAD.pack(*E._HEAD.unpack_from(data, 0)[:1], 1 << 30) + data[8:], m.shape)


def test_param2_flipped_code_words_never_crash(block):
    """Flipped bits in the coded stream give wrong symbols or CodecError, never a crash."""
    m, data = block
    side_len, nwords = E._HEAD.unpack_from(data, 0)
    start = E._HEAD.size + side_len
    rng = np.random.default_rng(1)
    for i in range(40):
        b = bytearray(data)
        pos = start + int(rng.integers(0, 4 * nwords))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        if i % 4 == 0:  # a zero last word, which the ANS coder refuses
            b[start + 4 * nwords - 4 : start + 4 * nwords] = bytes(4)
        try:
            out = entropy_layout("param2").decode(bytes(b), m.shape)
        except CodecError:
            continue
        assert out.shape == m.shape and out.dtype == np.int32


def test_param2_window_rounding_stays_within_max_span():
    """Rounding a cluster's window out must not push it past MAX_SPAN."""
    m = np.zeros((4, 8), np.int32)
    m[0, 0], m[0, 1] = -30000, 30000  # span 60001: rounds to 65537 (> MAX_SPAN) if unchecked
    m[1, 3] = 5
    coder = entropy_layout("param2")
    assert np.array_equal(coder.decode(coder.encode(m), m.shape), m)


@pytest.mark.parametrize("layout", ["rans", "param2", "param"])
def test_side_info_declaring_more_model_values_than_the_block_can_use_is_refused_before_any_is_weighed(
        layout, monkeypatch):
    """Every cluster at the widest window: without the budget, the decoder would weigh
    1,000 x 65,536 values (minutes for a whole chunk of such blocks) for a 2 x 1,000 block."""
    from kvzip.codecs.entropy import _common

    g, n = 1000, 2
    side = b"".join([
        struct.pack("<I", g), np.zeros(g, "<i4").tobytes(), np.arange(g, dtype="<u2").tobytes(),
        np.zeros(3 * g, np.uint8).tobytes(), np.full(g, -32768, "<i4").tobytes(),
        np.full(g, E.MAX_SPAN, "<i4").tobytes(),
    ]) + (bytes(2 * g) if layout == "param2" else b"")  # param2: each cluster's raw bits and tuple size
    weighed = []
    monkeypatch.setattr(_common, "_param_weights", lambda *a: weighed.append(1) or pytest.fail("weighed"))
    coder = entropy_layout(layout)
    with pytest.raises(CodecError, match="more model values"):
        coder._decode(side, np.zeros(0, coder.word if hasattr(coder, "word") else np.uint32),
                      np.zeros(0, np.uint8), g, n)
    assert not weighed


def test_the_encoder_keeps_to_the_same_budget(monkeypatch):
    """An encoder never writes what its decoder refuses: over the budget it stops, as it
    does for a row wider than MAX_SPAN (the step is too fine)."""
    from kvzip.codecs.entropy import _common

    m = np.zeros((4, 8), np.int32)
    m[0, 0], m[0, 1] = -50, 50  # a window of 101 values for 32 elements
    coder = entropy_layout("rans")
    assert np.array_equal(coder.decode(coder.encode(m), m.shape), m)
    monkeypatch.setattr(_common, "SPAN_SLACK", 16)
    with pytest.raises(CodecError, match="step too fine"):
        coder.encode(m)
