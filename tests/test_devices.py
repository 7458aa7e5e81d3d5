"""Issue 16: device and dtype choices, and memory that stays bounded.

Everything here runs on the CPU.  The accelerator paths have their own tests at the end,
which skip (saying why) where torch sees no CUDA device; ``benchmarks/gpu_check.py`` runs
everything that needs one in a single command.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvzip import api
from kvzip.errors import InputError
from kvzip.formats import open_kvz
from kvzip.levels import attach_kv, load_kv, stream_prefill, write_kvz
from kvzip.model import KVModel
from kvzip.model.device import resolve_device, resolve_model_dtype
from tests.tiny import tiny_model, windowed_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 10  # 450 byte tokens


def _payloads(path) -> list[bytes]:
    with open_kvz(path) as reader:
        return [reader.read_payload(e) for e in reader.entries]


def _header_minus_time(path) -> dict:
    with open_kvz(path) as reader:
        raw = dict(reader.header.raw)
    raw.pop("created", None)
    return raw


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("mistral", 16)])
@pytest.mark.parametrize("chunk_tokens", [64, 100])
def test_streamed_encode_writes_the_bytes_of_the_whole_cache_path(tmp_path, family, window, chunk_tokens):
    km = tiny_model(family) if window is None else windowed_model(family, window)
    ids = km.encode_text(TEXT, special_tokens=True)
    levels = ["lossless", "balanced"]
    whole, streamed = tmp_path / "whole.kvz", tmp_path / "streamed.kvz"
    write_kvz(km.prefill(ids), ids, whole, km, levels=levels, chunk_tokens=chunk_tokens, dtype="float32")
    summary = write_kvz(stream_prefill(km, ids, chunk_tokens), ids, streamed, km, levels=levels,
                        chunk_tokens=chunk_tokens, dtype="float32")
    assert _payloads(streamed) == _payloads(whole)
    assert _header_minus_time(streamed) == _header_minus_time(whole)
    assert summary.chunks == -(-len(ids) // chunk_tokens)
    assert summary.prefill_seconds > 0


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16)])
def test_a_prefill_cache_offloaded_to_disk_writes_the_same_file(tmp_path, family, window):
    km = tiny_model(family) if window is None else windowed_model(family, window)
    ids = km.encode_text(TEXT, special_tokens=True)
    files = []
    for offload in (None, tmp_path):
        out = tmp_path / f"{offload is None}.kvz"
        write_kvz(stream_prefill(km, ids, 64, offload=offload), ids, out, km, levels=["lossless"],
                  chunk_tokens=64, dtype="float32")
        files.append(_payloads(out))
    assert files[0] == files[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["False.kvz", "True.kvz"]  # no cache file left


def test_streamed_prefill_hands_over_what_the_final_cache_keeps():
    km = windowed_model("gemma3", 16)
    ids = km.encode_text(TEXT[:200], special_tokens=True)
    whole = km.prefill(ids)
    got = [[] for _ in range(km.num_layers)]
    for batch in km.prefill_chunks(ids, 32, step=64):
        assert len(batch) == 2 or batch[-1][0] + batch[-1][1] == len(ids)
        for _, _, layers in batch:
            for i, part in enumerate(layers):
                assert part.device.type == "cpu"
                got[i].append(part)
    for i in range(km.num_layers):
        torch.testing.assert_close(torch.cat(got[i], dim=2), whole.layers[i], rtol=1e-5, atol=1e-5)


def test_device_and_dtype_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps")
    assert resolve_model_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_model_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert resolve_model_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(InputError, match="--device must be"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="--model-dtype must be"):
        resolve_model_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_fingerprint_does_not_depend_on_the_weights_dtype():
    km = tiny_model("llama")
    fp32 = km.identity()["fingerprint"]
    half = KVModel(tiny_model("llama").model.to(torch.bfloat16), km.tokenizer)
    assert half.identity()["fingerprint"] == fp32
    other = KVModel(tiny_model("llama", seed=1).model, km.tokenizer)
    assert other.identity()["fingerprint"] != fp32


def test_files_written_before_the_dtype_free_fingerprint_still_attach(tmp_path):
    km = tiny_model("llama")
    ids = km.encode_text(TEXT[:120], special_tokens=True)
    path = tmp_path / "old.kvz"
    legacy = km.legacy_identity()
    assert legacy["fingerprint"] != km.identity()["fingerprint"]
    original = km.identity
    km.identity = lambda: legacy  # what kvzip 0.x wrote
    write_kvz(km.prefill(ids), ids, path, km, levels=["lossless"], chunk_tokens=64, dtype="float32")
    km.identity = original
    with open_kvz(path) as reader:
        assert reader.header.model.fingerprint == legacy["fingerprint"]
        km.check_stored_cache(reader.header)  # accepted
    stranger = KVModel(tiny_model("llama", seed=1).model, km.tokenizer)
    with open_kvz(path) as reader, pytest.raises(Exception, match="does not match"):
        stranger.check_stored_cache(reader.header)


def test_a_cache_captured_in_bfloat16_attaches_in_float32(tmp_path):
    """Captured with bf16 weights, attached to the fp32 model: it works, and the next-token
    distributions stay close (the difference is the weights' rounding)."""
    fp32 = tiny_model("llama")
    bf16 = KVModel(tiny_model("llama").model.to(torch.bfloat16), fp32.tokenizer)
    ids = fp32.encode_text(TEXT[:300], special_tokens=True)
    path = tmp_path / "bf16.kvz"
    write_kvz(stream_prefill(bf16, ids, 64), ids, path, bf16, levels=["lossless"], chunk_tokens=64, dtype="bfloat16")
    loaded = load_kv(path)
    with open_kvz(path) as reader:
        fp32.check_stored_cache(reader.header)
    cont = fp32.encode_text(" and then it ran away.", special_tokens=False)
    ref = fp32.teacher_force(fp32.prefill(ids), cont)
    got = fp32.teacher_force(loaded.kv, cont)
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < kl < 0.05


def test_encode_and_generate_take_a_device_and_a_model_dtype(tmp_path, monkeypatch):
    km_dir = tmp_path / "model"
    from tests.tiny import save_tiny_model

    save_tiny_model(km_dir)
    out = tmp_path / "doc.kvz"
    summary = api.encode(TEXT, out, model=str(km_dir), levels=["lossless"], device="cpu",
                         model_dtype="bfloat16", if_no_profile="uncalibrated")
    assert summary.dtype == "bfloat16"
    result = api.generate(out, " Again:", model=str(km_dir), device="cpu", model_dtype="float32",
                          max_new_tokens=4)
    assert len(result.new_token_ids) == 4
    with pytest.raises(InputError, match="--device must be"):
        api.encode(TEXT, out, model=str(km_dir), device="gpu0")


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("mistral", 16)])
@pytest.mark.parametrize("level,dtype", [("lossless", "float32"), ("balanced", "float32"), ("lossless", "bfloat16")])
def test_attach_decodes_straight_into_the_models_cache(tmp_path, family, window, level, dtype):
    km = tiny_model(family) if window is None else windowed_model(family, window)
    ids = km.encode_text(TEXT, special_tokens=True)
    path = tmp_path / "doc.kvz"
    write_kvz(stream_prefill(km, ids, 64), ids, path, km, levels=[level], chunk_tokens=64, dtype=dtype,
              profile=None)
    attached = attach_kv(path, km)
    loaded = load_kv(path)
    assert attached.token_ids == ids and attached.level == level
    for i, layer in enumerate(attached.cache.layers):
        want = loaded.kv.layers[i].to(torch.float32)
        assert layer.keys.dtype == km.model.dtype and layer.keys.shape[2] == want.shape[2]
        torch.testing.assert_close(layer.keys[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(layer.values[0], want[1], rtol=0, atol=0)
        assert getattr(layer, "cumulative_length", len(ids)) == len(ids)
    prompt = km.encode_text(" Once more:", special_tokens=False)
    got = km.generate(ids + prompt, cache=attached.cache, max_new_tokens=6)
    assert got == km.generate(ids + prompt, kv=loaded.kv, max_new_tokens=6)
    if level == "lossless" and dtype == "float32":
        assert got == km.generate(ids + prompt, max_new_tokens=6)  # as from the text


def test_attach_refuses_another_models_file_before_allocating(tmp_path, monkeypatch):
    km = tiny_model("llama")
    ids = km.encode_text(TEXT[:100], special_tokens=True)
    path = tmp_path / "doc.kvz"
    write_kvz(km.prefill(ids), ids, path, km, levels=["lossless"], chunk_tokens=64, dtype="float32")
    stranger = KVModel(tiny_model("llama", seed=1).model, km.tokenizer)
    monkeypatch.setattr(KVModel, "empty_cache", lambda *a: pytest.fail("allocated before the check"))
    with pytest.raises(Exception, match="does not match"):
        attach_kv(path, stranger)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none here)")
def test_cuda_round_trip(tmp_path):  # pragma: no cover - run by benchmarks/gpu_check.py
    cpu = tiny_model("llama")
    gpu = KVModel(tiny_model("llama").model.to("cuda"), cpu.tokenizer)
    ids = cpu.encode_text(TEXT, special_tokens=True)
    path = tmp_path / "gpu.kvz"
    write_kvz(stream_prefill(gpu, ids, 64), ids, path, gpu, levels=["lossless"], chunk_tokens=64, dtype="float32")
    loaded = load_kv(path)
    want = gpu.generate(ids + [65, 66], max_new_tokens=8)
    assert gpu.generate(ids + [65, 66], kv=loaded.kv, max_new_tokens=8) == want
    np.testing.assert_allclose(loaded.kv.dense.numpy(), cpu.prefill(ids).dense.numpy(), rtol=1e-3, atol=1e-3)


def test_a_profile_bound_to_the_old_fingerprint_is_rebound_once(tmp_path, monkeypatch):
    from kvzip.levels import list_profiles, model_profile
    from kvzip.levels.calibrate import CalibrationOptions, calibrate
    from kvzip.levels.resolve import rebind_profile

    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "profiles"))
    km = tiny_model("llama", seed=3)
    text = "Calibration text about rivers, hills and towns. " * 40
    data, _ = calibrate(km, [("t", text)], CalibrationOptions(tokens_per_text=256, continuation=64,
                                                              sensitivity_texts=1))
    from kvzip.codecs.profile import profile_from_bytes

    fresh = profile_from_bytes(data)
    legacy = km.legacy_identity()["fingerprint"]
    old = rebind_profile(fresh, legacy)  # what kvzip 0.x wrote for this model
    for p in (tmp_path / "profiles").iterdir():
        if p.name != f"{old.digest}.kvzprofile":
            p.unlink()
    assert list_profiles(km.identity()["fingerprint"]) == []
    got = model_profile(km, if_missing="error")
    assert got.model_fingerprint == km.identity()["fingerprint"] and got.digest != old.digest
    assert got.meta["rebound_from"] == old.digest
    np.testing.assert_array_equal(got.tensors["step_scale"], old.tensors["step_scale"])
    assert model_profile(km, if_missing="error").digest == got.digest  # found directly the next time
    assert model_profile(km, old.path, if_missing="error").digest == got.digest  # named explicitly


def test_the_device_decode_matches_the_codecs_and_attaches(tmp_path, monkeypatch):
    """The basis and RoPE as torch operations (what runs on an accelerator), checked on the
    CPU: the same chunk as the codec's numpy decode, and an attach through it generates
    as the numpy one does."""
    import kvzip.levels.files as files
    from kvzip.levels import open_cache
    from kvzip.levels.calibrate import CalibrationOptions, calibrate
    from kvzip.levels.device_decode import decode_chunk_on_device
    from kvzip.levels.profiles import write_profile

    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "profiles"))
    km = tiny_model("qwen2", seed=5)
    data, _ = calibrate(km, [("t", TEXT)], CalibrationOptions(tokens_per_text=300, continuation=64,
                                                              sensitivity_texts=1))
    prof = write_profile(data)
    ids = km.encode_text(TEXT, special_tokens=True)
    path = tmp_path / "p.kvz"
    write_kvz(stream_prefill(km, ids, 64), ids, path, km, levels=["balanced"], chunk_tokens=64,
              dtype="float32", profile=prof)
    with open_cache(path) as f:
        for e in f.kv_entries("balanced"):
            got = decode_chunk_on_device(f, e, torch.device("cpu"))
            np.testing.assert_allclose(got.numpy(), f.decode_chunk(e), rtol=1e-5, atol=1e-6)
    prompt = km.encode_text(" Again:", special_tokens=False)
    plain = km.generate(ids + prompt, cache=attach_kv(path, km, room=10).cache, max_new_tokens=5)
    monkeypatch.setattr(files, "is_accelerator", lambda device: True)  # take the device path on the CPU
    with open_cache(path) as f:
        assert files.on_device(km, f.header, [f.codecs.codec(0)])  # so the next attach takes it
    assert km.generate(ids + prompt, cache=attach_kv(path, km, room=10).cache, max_new_tokens=5) == plain


@pytest.mark.parametrize("keep", [None, 0.5], ids=["windows", "kept"])
def test_the_device_decode_attaches_files_whose_layers_hold_different_positions(tmp_path, monkeypatch, keep):
    """Block by block (a hybrid model's windows; entries kept per head): the device path,
    taken on the CPU, fills the cache the numpy path fills."""
    import kvzip.levels.files as files
    from kvzip import api
    from kvzip.levels.calibrate import CalibrationOptions, calibrate
    from kvzip.levels.profiles import write_profile

    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(tmp_path / "profiles"))
    km = windowed_model("gemma3", 16, seed=3)
    data, _ = calibrate(km, [("t", TEXT)], CalibrationOptions(tokens_per_text=300, continuation=64,
                                                              sensitivity_texts=1, basis="pca"))
    write_profile(data)
    path = tmp_path / "w.kvz"
    api.encode(TEXT, path, model=km, levels=["balanced"], chunk_tokens=64, if_no_profile="error", keep=keep,
               keep_by="prefill" if keep else None)
    with files.open_cache(path) as f:
        assert not f.header.is_dense
    ids = km.encode_text(TEXT, special_tokens=True)
    prompt = km.encode_text(" Again:", special_tokens=False)
    plain = km.generate(ids + prompt, cache=attach_kv(path, km, room=10).cache, max_new_tokens=5)
    numpy_cache = attach_kv(path, km, room=10).cache
    monkeypatch.setattr(files, "is_accelerator", lambda device: True)  # take the device path on the CPU
    with files.open_cache(path) as f:
        assert files.on_device(km, f.header, [f.codecs.codec(0)])
    device_cache = attach_kv(path, km, room=10).cache
    for a, b in zip(numpy_cache.layers, device_cache.layers):
        if hasattr(a, "k"):  # pruned layers: each head its entries
            assert a.count == b.count
            for h in range(len(a.k)):
                torch.testing.assert_close(a.k[h][: a.count[h]], b.k[h][: b.count[h]], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a.v[h][: a.count[h]], b.v[h][: b.count[h]], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert km.generate(ids + prompt, cache=attach_kv(path, km, room=10).cache, max_new_tokens=5) == plain
