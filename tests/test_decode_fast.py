"""Decoding a level's chunks side by side (kvzip.levels.executor): threads for the codecs
that release the GIL, bit-identical to one thread; the GIL-holding layouts (constriction's)
decode on the calling thread; failures surface as kvzip errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzip.codecs import ChunkContext, codec_from_config
from kvzip.codecs.transforms import rope_cos_sin, rotate
from kvzip.errors import ChecksumError, CodecError
from kvzip.formats import KvzWriter
from kvzip.levels import LEVELS, executor, load_kv, open_cache

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


def thread_ids_of_decodes(monkeypatch) -> set[int]:
    """The threads that decode chunks from now on (each waits once for a second one,
    so two decoders are seen working at the same time whenever two are asked for)."""
    from kvzip.levels.files import CacheFile

    real, seen = CacheFile.decode_chunk_into, set()
    lock = threading.Lock()

    def decode_chunk_into(self, entry, out):
        with lock:
            seen.add(threading.get_ident())
        real(self, entry, out)

    monkeypatch.setattr(CacheFile, "decode_chunk_into", decode_chunk_into)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threaded_decode_is_bit_identical(tmp_path, dtype):
    path = write(tmp_path / "a.kvz", dtype)
    with open_cache(path) as cache:
        for level in FILE_LEVELS:
            serial = cache.decode_level(level, decoders=1)
            par = cache.decode_level(level, decoders=3)
            assert par.dtype == serial.dtype and par.shape == serial.shape
            assert par.tobytes() == serial.tobytes()


def test_threads_share_the_work(tmp_path, monkeypatch):
    path = write(tmp_path / "a.kvz")
    with open_cache(path) as cache:
        serial = cache.decode_level("balanced", decoders=1)
    from kvzip.levels.files import CacheFile

    real, seen = CacheFile.decode_chunk_into, set()
    both = threading.Barrier(2, timeout=30)

    def decode_chunk_into(self, entry, out):
        if threading.get_ident() not in seen:  # each decoder waits for the other once
            seen.add(threading.get_ident())
            both.wait()
        real(self, entry, out)

    monkeypatch.setattr(CacheFile, "decode_chunk_into", decode_chunk_into)
    with open_cache(path) as cache:
        par = cache.decode_level("balanced", decoders=2)
    assert len(seen) == 2 and par.tobytes() == serial.tobytes()


def test_gil_holding_layouts_and_small_levels_decode_on_this_thread(tmp_path, monkeypatch):
    path = write(tmp_path / "a.kvz")
    seen = thread_ids_of_decodes(monkeypatch)
    with open_cache(path) as cache:
        for level in ("balanced-p2", "cachegen"):  # constriction holds the GIL
            cache.decode_level(level, decoders=4)
        cache.decode_level("balanced")  # below MIN_THREAD_ELEMENTS
    assert seen == {threading.get_ident()}


def test_env_sets_the_threads(tmp_path, monkeypatch):
    path = write(tmp_path / "a.kvz")
    monkeypatch.setattr(executor, "MIN_THREAD_ELEMENTS", 0)
    seen = thread_ids_of_decodes(monkeypatch)
    monkeypatch.setenv(executor.ENV_THREADS, "1")
    with open_cache(path) as cache:
        cache.decode_level("balanced")
    assert len(seen) == 1
    monkeypatch.setenv(executor.ENV_THREADS, "x")
    with open_cache(path) as cache, pytest.raises(Exception, match="KVZIP_DECODE_WORKERS must be an integer"):
        cache.decode_level("balanced")


def test_load_kv_keeps_the_dtype(tmp_path):
    path = write(tmp_path / "a.kvz")
    par = load_kv(path, "balanced", decoders=2)
    ser = load_kv(path, "balanced", decoders=1)
    assert par.kv.dense.dtype == torch.float32 and torch.equal(par.kv.dense, ser.kv.dense)
    bf = load_kv(write(tmp_path / "b.kvz", "bfloat16"), "cachegen", decoders=2)
    assert bf.kv.dense.dtype == torch.bfloat16


@pytest.mark.parametrize("level", ["balanced", "balanced-p2", "cachegen", "lossless"])
def test_corrupt_chunk_on_a_thread_is_a_codec_error(tmp_path, level):
    path = write(tmp_path / "bad.kvz", corrupt_chunk=6)
    with open_cache(path) as cache, pytest.raises(CodecError):
        cache.decode_level(level, decoders=2)
    good = write(tmp_path / "good.kvz")
    with open_cache(good) as cache:
        assert cache.decode_level(level, decoders=2).tobytes() == cache.decode_level(level, decoders=1).tobytes()


def test_checksum_mismatch_names_the_chunk(tmp_path):
    path = write(tmp_path / "a.kvz")
    with open_cache(path) as cache:
        entry = cache.kv_entries("balanced")[4]
    data = bytearray(path.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with open_cache(path) as cache, pytest.raises(ChecksumError, match="chunk 4"):
        cache.decode_level("balanced", decoders=2)


def test_a_file_replaced_under_the_reader_is_still_the_one_it_opened(tmp_path):
    path = write(tmp_path / "a.kvz")
    with open_cache(path) as cache:
        before = cache.decode_level("balanced", decoders=1)
        os.replace(write(tmp_path / "b.kvz", "float16"), path)
        # threads read through the reader's own handle
        assert cache.decode_level("balanced", decoders=2).tobytes() == before.tobytes()
