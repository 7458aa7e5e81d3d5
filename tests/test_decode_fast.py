"""Parallel decoding (kvzip.formats.parallel): bit-identical to in-process decoding,
on threads (codecs that release the GIL) and on worker processes (the older entropy
layouts, cachegen, lossless), failures surface as kvzip errors, no leaked buffers."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzip.codecs import LEVELS, ChunkContext, codec_from_config
from kvzip.codecs.transforms import rope_cos_sin, rotate
from kvzip.errors import ChecksumError, CodecError, FormatError
from kvzip.formats import KvzWriter, open_kvz, parallel
from kvzip.pipeline import load_kv

L, H, D = 3, 2, 16
TOKENS, CHUNK = 150, 16  # ten chunks, the last one short
INV_FREQ = tuple((1.0 / (10000.0 ** (np.arange(0, D, 2) / D))).tolist())
FILE_LEVELS = {
    "balanced": LEVELS["balanced"],
    "high": LEVELS["high"],
    "balanced-p2": {**LEVELS["balanced"], "entropy": "param2"},
    "cachegen": {"id": "cachegen"},
    "lossless": LEVELS["lossless"],
}
THREAD_LEVELS = {"balanced", "high"}  # the rans layout: decoded on threads


def realistic_kv(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pre = rng.normal(0, 2, (L, H, 1, D)) + np.exp(rng.normal(0, 0.7, (L, H, 1, D))) * rng.normal(0, 1, (L, H, TOKENS, D))
    cos, sin = rope_cos_sin(ChunkContext(0, TOKENS, L, H, D, "float32", INV_FREQ))
    keys = rotate(pre.astype(np.float32), cos, sin, +1.0)
    return np.stack([keys, rng.laplace(0, 0.5, (L, H, TOKENS, D)).astype(np.float32)])


def write(path: Path, dtype: str = "float32", corrupt_chunk: int | None = None) -> Path:
    kv = realistic_kv()
    if dtype == "bfloat16":
        kv = (kv.view(np.uint32) >> 16).astype(np.uint16)
    else:
        kv = kv.astype(dtype)
    header = {
        "format": "kvz", "model": {"fingerprint": "sha256:test", "name": "test-model"},
        "num_layers": L, "kv_heads": H, "head_dim": D, "dtype": dtype, "token_count": TOKENS,
        "chunk_tokens": CHUNK, "rope": {"inv_freq": list(INV_FREQ)}, "chat": None,
        "levels": [{"name": name, "codec": cfg} for name, cfg in FILE_LEVELS.items()],
    }
    codecs = [codec_from_config(cfg) for cfg in FILE_LEVELS.values()]
    with KvzWriter(path, header) as writer:
        for chunk, start in enumerate(range(0, TOKENS, CHUNK)):
            n = min(CHUNK, TOKENS - start)
            piece = np.ascontiguousarray(kv[:, :, :, start : start + n])
            ctx = ChunkContext(start, n, L, H, D, dtype, INV_FREQ)
            for level, codec in enumerate(codecs):
                payload = codec.encode(piece, ctx)
                if chunk == corrupt_chunk:  # still a valid container: the codec must refuse it
                    payload = payload[:20] + bytes(len(payload) - 20)
                writer.add_kv(chunk, level, start, n, payload)
        writer.set_token_ids(np.arange(TOKENS))
        writer.commit()
    return path


def leftover_buffers() -> set[str]:
    """This process's shared buffers (names carry the pid: other processes' are theirs)."""
    dirs = {parallel.buffer_dir(1), parallel.buffer_dir(1 << 62), Path(tempfile.gettempdir())}
    mine = f"{parallel.BUFFER_PREFIX}{os.getpid()}-*"
    return {str(p) for d in dirs if d.is_dir() for p in d.glob(mine)}


@pytest.fixture(scope="module")
def workers():
    yield
    parallel.shutdown_workers()
    assert parallel.worker_pids() == []


@pytest.fixture
def workers_only(monkeypatch, workers):
    """The calling process hands out chunks but decodes none: the pool path is used."""
    monkeypatch.setattr(parallel, "PARENT_DECODES", False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parallel_decode_is_bit_identical(tmp_path, dtype, workers_only):
    path = write(tmp_path / "a.kvz", dtype)
    before = leftover_buffers()
    with open_kvz(path) as reader:
        for level in FILE_LEVELS:
            serial = reader.decode_level(level, decoders=1)
            assert serial.flags.owndata  # the in-process path
            par = reader.decode_level(level, decoders=3)
            # threads write an ordinary array; workers, the shared buffer
            assert par.flags.owndata == (level in THREAD_LEVELS)
            assert par.dtype == serial.dtype and par.shape == serial.shape
            assert par.tobytes() == serial.tobytes()
    assert len(parallel.worker_pids()) == 2
    assert leftover_buffers() == before


def test_parent_and_workers_share_the_work(tmp_path, workers):
    path = write(tmp_path / "a.kvz")
    with open_kvz(path) as reader:
        serial = reader.decode_level("balanced-p2", decoders=1)
        for _ in range(2):
            assert reader.decode_level("balanced-p2", decoders=2).tobytes() == serial.tobytes()


def test_threads_share_the_work(tmp_path, monkeypatch):
    path = write(tmp_path / "a.kvz")
    with open_kvz(path) as reader:
        serial = reader.decode_level("balanced", decoders=1)
    real, seen = parallel.decode_into, set()
    both = threading.Barrier(2, timeout=30)

    def decode_into(reader, level, chunks, out):
        if threading.get_ident() not in seen:  # each decoder waits for the other once
            seen.add(threading.get_ident())
            both.wait()
        real(reader, level, chunks, out)

    monkeypatch.setattr(parallel, "decode_into", decode_into)
    monkeypatch.setattr(parallel, "decode_level_parallel", None)  # no worker processes
    with open_kvz(path) as reader:
        par = reader.decode_level("balanced", decoders=2)
    assert len(seen) == 2 and par.tobytes() == serial.tobytes()


def test_small_level_decodes_in_process(tmp_path, monkeypatch):
    path = write(tmp_path / "a.kvz")
    monkeypatch.setattr(parallel, "decode_level_parallel", None)  # would fail if called
    monkeypatch.setattr(parallel, "decode_level_threads", None)
    with open_kvz(path) as reader:
        for level in ("balanced", "balanced-p2"):  # below MIN_THREAD/PARALLEL_ELEMENTS
            assert reader.decode_level(level).flags.owndata


def test_env_sets_decoders(tmp_path, monkeypatch, workers_only):
    path = write(tmp_path / "a.kvz")
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setenv(parallel.ENV_WORKERS, "1")
    with open_kvz(path) as reader:
        assert reader.decode_level("balanced-p2").flags.owndata
    monkeypatch.setenv(parallel.ENV_WORKERS, "2")
    with open_kvz(path) as reader:
        assert not reader.decode_level("balanced-p2").flags.owndata


def test_load_kv_wraps_the_shared_buffer(tmp_path, workers_only):
    path = write(tmp_path / "a.kvz")
    par = load_kv(path, "balanced-p2", decoders=2)
    ser = load_kv(path, "balanced-p2", decoders=1)
    assert par.kv.dtype == torch.float32 and torch.equal(par.kv, ser.kv)
    assert par.kv.numpy().base is not None  # a view of the mapping, not a copy
    bf = load_kv(write(tmp_path / "b.kvz", "bfloat16"), "cachegen", decoders=2)
    assert bf.kv.dtype == torch.bfloat16


@pytest.mark.parametrize("level", ["balanced", "balanced-p2", "cachegen", "lossless"])
def test_corrupt_chunk_in_a_worker_is_a_codec_error(tmp_path, level, workers_only):
    path = write(tmp_path / "bad.kvz", corrupt_chunk=6)
    before = leftover_buffers()
    with open_kvz(path) as reader, pytest.raises(CodecError):
        reader.decode_level(level, decoders=2)
    assert leftover_buffers() == before
    good = write(tmp_path / "good.kvz")  # the pool still works afterwards
    with open_kvz(good) as reader:
        assert reader.decode_level(level, decoders=2).tobytes() == reader.decode_level(level, decoders=1).tobytes()


def test_checksum_mismatch_in_a_worker(tmp_path, workers_only):
    path = write(tmp_path / "a.kvz")
    with open_kvz(path) as reader:
        entry = reader.kv_entries("balanced-p2")[4]
    data = bytearray(path.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x10
    with open_kvz(path) as reader:  # header and index still parse; the payload is bad
        path.write_bytes(bytes(data))  # same size, same header: the worker accepts the file
        with pytest.raises(ChecksumError, match="chunk 4"):
            reader.decode_level("balanced-p2", decoders=2)


def test_file_replaced_under_the_reader(tmp_path, workers_only):
    path = write(tmp_path / "a.kvz")
    with open_kvz(path) as reader:
        before = reader.decode_level("balanced", decoders=1)
        other = write(tmp_path / "b.kvz", "float16")
        os.replace(other, path)
        with pytest.raises(FormatError, match="changed"):  # workers open the path anew
            reader.decode_level("balanced-p2", decoders=2)
        # threads read through the reader's own handle: still the file it opened
        assert reader.decode_level("balanced", decoders=2).tobytes() == before.tobytes()


def test_dead_worker_is_a_codec_error_not_a_hang(workers):
    worker = parallel._Worker()
    worker.proc.kill()
    worker.proc.wait()
    with pytest.raises(CodecError, match="exited unexpectedly"):
        worker.call({"path": "nowhere"})
    worker.close()


def test_worker_reports_unexpected_failures_as_codec_errors(tmp_path, workers):
    worker = parallel._Worker()
    try:
        reply = worker.call({"path": str(tmp_path / "missing.kvz"), "identity": [], "level": "x",
                             "chunks": [], "out": "", "shape": [], "dtype": "<f4"})
        assert reply["error"] == "InputError"
        reply = worker.call({"bogus": True})
        with pytest.raises(CodecError, match="decode worker failed"):
            raise parallel._error_from_reply(reply)
    finally:
        worker.close()
