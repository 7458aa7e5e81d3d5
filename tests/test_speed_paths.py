"""Fast encode paths: ``write_kvz`` on threads writes the bytes one thread writes,
cleans up after itself, and reports a codec's errors as one-line kvzip errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvzip.codecs import codec_from_config
from kvzip.codecs.entropy import RangeCoder
from kvzip.errors import KvzipError
from kvzip.formats import open_kvz
from kvzip.levels import open_cache, write_kvz

L, H, T, D = 3, 2, 200, 16


class FakeModel:
    name = "fake"
    tokenizer = None

    def identity(self):
        return {"fingerprint": "sha256:" + "0" * 64, "name": "fake"}

    def rope_inv_freq(self):
        return tuple((1 / (10000 ** (np.arange(0, D, 2) / D))).tolist())

    def rope_tables(self):
        return (self.rope_inv_freq(),), (0,) * L

    def attention_info(self):
        return None


LEVELS = [("a", codec_from_config({"id": "kvzip-lossy", "key_step": 0.3, "value_step": 0.3, "entropy": "param2"})),
          ("b", codec_from_config({"id": "kvzip-lossy", "key_step": 1.0, "value_step": 1.0, "value_token_exp": 0.5, "entropy": "param2"}))]


def _kv(seed=0):
    g = np.random.default_rng(seed)
    kv = g.standard_normal((2, L, H, T, D)).astype(np.float32) * np.linspace(0.2, 3, D, dtype=np.float32)
    return torch.from_numpy(kv)


RANS_LEVELS = [("a", codec_from_config({"id": "kvzip-lossy", "key_step": 0.3, "value_step": 0.3, "entropy": "rans"})),
               ("b", codec_from_config({"id": "kvzip-lossy", "key_step": 1.0, "value_step": 1.0, "entropy": "rans"}))]


def _write(path, kv, encoders, levels=LEVELS, dtype="float32"):
    return write_kvz(kv, list(range(T)), path, FakeModel(), levels=levels, chunk_tokens=32,
                     dtype=dtype, extra_header={"created": "fixed"}, encoders=encoders)


def _leftovers(tmp_path):
    """Any hidden temporary file beside the outputs."""
    return {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threaded_encode_is_byte_identical(tmp_path, dtype):
    kv = _kv().to(torch.bfloat16) if dtype == "bfloat16" else _kv()
    one = _write(tmp_path / "one.kvz", kv, encoders=1, levels=RANS_LEVELS, dtype=dtype)
    three = _write(tmp_path / "three.kvz", kv, encoders=3, levels=RANS_LEVELS, dtype=dtype)
    assert (tmp_path / "one.kvz").read_bytes() == (tmp_path / "three.kvz").read_bytes()
    assert one.file_bytes == three.file_bytes
    with open_cache(tmp_path / "three.kvz") as r:
        assert r.decode_level("a").shape == (2, L, H, T, D)
    assert not _leftovers(tmp_path)


def test_chunks_encode_side_by_side(tmp_path, monkeypatch):
    """Two threads code two chunks at once (each first chunk waits for the other)."""
    import threading

    real, seen = RANS_LEVELS[0][1].encode, set()
    both = threading.Barrier(2, timeout=30)

    def encode(kv, ctx):
        if threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            both.wait()
        return real(kv, ctx)

    monkeypatch.setattr(RANS_LEVELS[0][1], "encode", encode)
    _write(tmp_path / "x.kvz", _kv(), encoders=2, levels=RANS_LEVELS)
    assert len(seen) == 2


def test_encode_errors_are_one_line_and_leave_nothing(tmp_path):
    kv = _kv()
    kv[0, 0, 0, 100, 0] = float("nan")  # refused by the codec, on a thread
    with pytest.raises(KvzipError) as info:
        _write(tmp_path / "bad.kvz", kv, encoders=2, levels=RANS_LEVELS)
    assert "\n" not in str(info.value)
    with pytest.raises(KvzipError) as serial:
        _write(tmp_path / "bad.kvz", kv, encoders=1, levels=RANS_LEVELS)
    assert type(serial.value) is type(info.value) and str(serial.value) == str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_gil_holding_layouts_encode_on_this_thread(tmp_path, monkeypatch):
    import threading

    seen = set()
    real = LEVELS[0][1].encode
    monkeypatch.setattr(LEVELS[0][1], "encode", lambda kv, ctx: (seen.add(threading.get_ident()), real(kv, ctx))[1])
    _write(tmp_path / "p2.kvz", _kv(), encoders=3)
    assert seen == {threading.get_ident()}


def _reference_fit(hist, rid, k, n):
    """The encoder's parameter fit as first written (integer weights, full passes)."""
    from kvzip.codecs.entropy import _S_OFFSET, BETAS, _param_weights

    rows = int(rid[-1]) + 1
    mean = np.bincount(rid, hist * k, rows) / n
    mu4 = np.rint(4 * mean).astype(np.int64)
    best = np.full(rows, np.inf)
    sidx = np.zeros(rows, np.int64)
    shape = np.zeros(rows, np.int64)
    dev = np.abs(k - mu4[rid] / 4.0)
    for si, beta in enumerate(BETAS):
        s0 = np.maximum((beta * np.bincount(rid, hist * dev**beta, rows) / n) ** (1 / beta), 1 / 16)
        c0 = np.rint(8 * np.log2(s0)).astype(np.int64) + _S_OFFSET
        for dc in (-2, -1, 0, 1, 2):
            cand = np.clip(c0 + dc, 0, 255)
            w = _param_weights(k, mu4[rid], cand[rid], np.full(rid.size, si)).astype(np.float64)
            cost = n * np.log2(np.bincount(rid, w, rows)) - np.bincount(rid, hist * np.log2(w), rows)
            better = cost < best
            best = np.where(better, cost, best)
            sidx = np.where(better, cand, sidx)
            shape = np.where(better, si, shape)
    return mu4, sidx, shape


def test_fast_fit_matches_reference():
    from kvzip.codecs import entropy as E

    g = np.random.default_rng(1)
    m = np.rint(g.standard_normal((400, 64)) * g.uniform(0.05, 300, (400, 1))).astype(np.int64)
    m[::7] = np.rint(g.laplace(size=(m[::7].shape)) * 3)
    lo = m.min(1)
    span = m.max(1) - lo + 1
    coded = np.flatnonzero(span > 1)
    rid, kk, offs = E._ragged(span, coded)
    hist = np.bincount((m[coded] - lo[coded][:, None] + offs[:, None]).ravel(), minlength=kk.size).astype(float)
    k = kk + lo[coded][rid]
    bounds = np.append(offs, kk.size)
    got_all = RangeCoder._fit_param(hist, lo[coded], bounds, m.shape[1])
    for got, want in zip(got_all, _reference_fit(hist, rid, k, m.shape[1])):
        np.testing.assert_array_equal(got, want)


def test_float_division_of_the_fit_is_the_integer_division():
    """The encoder's fit divides in float64 (as ``_rans.fit_param`` does); it must land
    on the decoder's integer quotient everywhere."""
    from kvzip.codecs import entropy as E

    d = np.array([0, 1, 2, 3, 4, 5, 7, 100, 4095, 4096, 1 << 17, (1 << 18) - 1, 1 << 18], np.int64)
    s = np.arange(256)
    dd, ss = np.meshgrid(d, s)
    sf = E._s_fixed(ss.ravel())
    want = np.minimum((dd.ravel() << 22) // sf, E._U_LEN - 1)
    got = np.minimum((dd.ravel() << 22).astype(np.float64) / sf.astype(np.float64), E._U_LEN - 1).astype(np.intp)
    np.testing.assert_array_equal(got, want)


def test_a_callers_own_codec_object_encodes(tiny_llama, tmp_path):
    """A caller's own codec object (as benchmarks pass) is used as it is."""
    import numpy as np
    import torch

    from kvzip.codecs import Codec, register_codec
    from kvzip.levels import write_kvz

    @register_codec  # registered in this process only, as a benchmark script does
    class Raw(Codec):
        codec_id = "test-unregistered-raw"

        def params(self):
            return {}

        def encode(self, kv, ctx):
            return np.ascontiguousarray(kv).tobytes()

        def decode(self, payload, ctx):
            return np.frombuffer(payload, np.float32).reshape(ctx.shape)

    km = tiny_llama
    kv = torch.randn(2, km.num_layers, km.kv_heads, 300, km.head_dim)
    out = tmp_path / "raw.kvz"
    write_kvz(kv, list(range(300)), out, km, levels=[("raw", Raw())], chunk_tokens=64,
              dtype="float32", encoders=2)
    with open_kvz(out) as r:
        assert r.header.levels[0].codec["id"] == "test-unregistered-raw"
