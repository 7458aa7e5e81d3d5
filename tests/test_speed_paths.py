"""Fast encode paths: parallel ``write_kvz`` writes the bytes one process writes,
cleans up after itself, and reports worker errors as one-line kvzip errors."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzip.codecs import codec_from_config
from kvzip.codecs.entropy import RangeCoder
from kvzip.errors import KvzipError
from kvzip.formats import open_kvz, parallel
from kvzip.pipeline import write_kvz

L, H, T, D = 3, 2, 200, 16


class FakeModel:
    name = "fake"
    tokenizer = None

    def identity(self):
        return {"fingerprint": "sha256:" + "0" * 64, "name": "fake"}

    def rope_inv_freq(self):
        return tuple((1 / (10000 ** (np.arange(0, D, 2) / D))).tolist())


LEVELS = [("a", codec_from_config({"id": "kvzip-lossy", "key_step": 0.3, "value_step": 0.3, "entropy": "param2"})),
          ("b", codec_from_config({"id": "kvzip-lossy", "key_step": 1.0, "value_step": 1.0, "value_token_exp": 0.5, "entropy": "param2"}))]


def _kv(seed=0):
    g = np.random.default_rng(seed)
    kv = g.standard_normal((2, L, H, T, D)).astype(np.float32) * np.linspace(0.2, 3, D, dtype=np.float32)
    return torch.from_numpy(kv)


def _write(path, kv, encoders, levels=LEVELS):
    return write_kvz(kv, list(range(T)), path, FakeModel(), levels=levels, chunk_tokens=32,
                     dtype="float32", extra_header={"created": "fixed"}, encoders=encoders)


@pytest.fixture
def pool():
    yield
    parallel.shutdown_workers()
    assert parallel.worker_pids() == []


def _leftovers(tmp_path):
    """This process's shared buffers and any hidden temporary file beside the outputs."""
    dirs = {parallel.buffer_dir(1), parallel.buffer_dir(1 << 62), Path(tempfile.gettempdir())}
    mine = f"{parallel.BUFFER_PREFIX}{os.getpid()}-*"
    return {str(p) for d in dirs if Path(d).is_dir() for p in Path(d).glob(mine)} | {
        p.name for p in tmp_path.iterdir() if p.name.startswith(".")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parallel_encode_is_byte_identical(tmp_path, pool, dtype, monkeypatch):
    kv = _kv().to(torch.bfloat16) if dtype == "bfloat16" else _kv()
    one = write_kvz(kv, list(range(T)), tmp_path / "one.kvz", FakeModel(), levels=LEVELS, chunk_tokens=32,
                    dtype=dtype, extra_header={"created": "fixed"}, encoders=1)
    monkeypatch.setattr(parallel, "PARENT_DECODES", False)  # workers encode every chunk
    two = write_kvz(kv, list(range(T)), tmp_path / "two.kvz", FakeModel(), levels=LEVELS, chunk_tokens=32,
                    dtype=dtype, extra_header={"created": "fixed"}, encoders=3)
    assert len(parallel.worker_pids()) == 2
    assert (tmp_path / "one.kvz").read_bytes() == (tmp_path / "two.kvz").read_bytes()
    assert one.file_bytes == two.file_bytes
    with open_kvz(tmp_path / "two.kvz") as r:
        assert r.decode_level("a").shape == (2, L, H, T, D)
    assert not _leftovers(tmp_path)


def test_worker_errors_are_one_line_and_leave_nothing(tmp_path, pool, monkeypatch):
    kv = _kv()
    kv[0, 0, 0, 100, 0] = float("nan")  # refused by the codec, inside a worker
    monkeypatch.setattr(parallel, "PARENT_DECODES", False)
    with pytest.raises(KvzipError) as info:
        _write(tmp_path / "bad.kvz", kv, encoders=2)
    assert "\n" not in str(info.value)
    with pytest.raises(KvzipError) as serial:
        _write(tmp_path / "bad.kvz", kv, encoders=1)
    assert type(serial.value) is type(info.value) and str(serial.value) == str(info.value)
    assert not (tmp_path / "bad.kvz").exists()
    assert list(tmp_path.iterdir()) == []
    assert not _leftovers(tmp_path)


def test_dead_encode_worker_is_a_codec_error(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(parallel, "PARENT_DECODES", False)
    _write(tmp_path / "ok.kvz", _kv(), encoders=2)
    for pid in parallel.worker_pids():
        os.kill(pid, signal.SIGKILL)
    for w in parallel._POOL.workers:
        w.proc.wait()
    # the pool restarts dead workers; a worker dying mid-call is a CodecError
    _write(tmp_path / "ok2.kvz", _kv(), encoders=2)
    assert (tmp_path / "ok.kvz").read_bytes() == (tmp_path / "ok2.kvz").read_bytes()


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


def test_unregistered_codec_objects_encode_in_process(tiny_llama, tmp_path):
    """A caller's own codec object (as benchmarks pass) cannot be rebuilt in a worker
    from its config: write_kvz must encode it here instead of failing."""
    import numpy as np
    import torch

    from kvzip.codecs import Codec
    from kvzip.formats import open_kvz
    from kvzip.pipeline import write_kvz

    from kvzip.codecs import register_codec

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
