"""Sliding-window and hybrid models at contexts longer than their window.

A sliding layer's cache keeps its last ``window - 1`` positions; kvzip stores exactly
those (a 2.x file with a position layout), attaches them with each layer's true
position counter, and generation continues as if the whole text had been read.  The
models are tiny random ones of each family that mixes window and full layers.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import WINDOWED, windowed_model

from kvzip import api, errors
from kvzip.formats import BytesSource, KvzReader, PositionLayout, encode_header
from kvzip.levels import load_kv, open_cache, write_kvz

TEXT = (
    "The licenses for most software and other practical works are designed to take away "
    "your freedom to share and change the works. By contrast, the GNU General Public "
    "License is intended to guarantee your freedom to share and change all versions of a "
    "program--to make sure it remains free software for all its users. We, the Free "
    "Software Foundation, use the GNU General Public License for most of our software."
)
PROMPT = " In short, the license"


@pytest.fixture(scope="module", params=WINDOWED)
def windowed(request):
    return windowed_model(request.param, 16)


def first_forward_tokens(km, run):
    """(result of ``run()``, how many tokens the model's first forward pass was given)."""
    seen = []
    hook = km.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        return run(), seen[0]
    finally:
        hook.remove()


def test_capture_keeps_what_the_model_keeps(windowed):
    km = windowed
    ids = km.document_ids(TEXT, None)[:200]
    kv = km.prefill(ids, step=37)
    assert not kv.is_dense and kv.token_count == 200
    for i, window in enumerate(km.layer_windows()):
        held = kv.layout.positions[i][0]
        want = 200 if window is None else window - 1
        assert held.tolist() == list(range(200 - want, 200))
        assert kv.layers[i].shape == (2, km.kv_heads, want, km.head_dim)
    # the same keys as one pass with every layer keeping everything (then windowed)
    from transformers import DynamicCache

    cache = DynamicCache()
    km.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    for i, layer in enumerate(kv.layers):
        n = layer.shape[2]
        torch.testing.assert_close(layer[0], cache.layers[i].keys[0, :, -n:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [32, 7])
def test_lossless_file_generates_exactly_like_the_text(windowed, tmp_path, chunk_tokens):
    km = windowed
    ids = km.document_ids(TEXT, None)[:150]
    prompt = km.prompt_ids(PROMPT, None)
    out = tmp_path / "c.kvz"
    summary = write_kvz(km.prefill(ids), ids, out, km, levels=["lossless"], chunk_tokens=chunk_tokens,
                        dtype="float32")
    assert summary.raw_bytes == 4 * 2 * km.head_dim * km.kv_heads * sum(km.kept_positions(150))
    with open_cache(out) as f:
        assert f.version == (2, 0) and "positions" in f.header.features
    loaded = load_kv(out)
    base = km.generate(ids + prompt, max_new_tokens=16)
    got, first = first_forward_tokens(km, lambda: km.generate(ids + prompt, kv=loaded.kv, max_new_tokens=16))
    assert got == base
    assert first == len(prompt)  # the cache was used: only the new tokens were read
    # a direct forward (no positions, no mask, as teacher forcing calls it) matches too
    ref = km.teacher_force(km.prefill(ids[:1]), ids[1:] + prompt)[-len(prompt):]
    torch.testing.assert_close(km.teacher_force(loaded.kv, prompt), ref, atol=1e-4, rtol=1e-4)


def test_window_of_a_hundred_and_more(tmp_path):
    km = windowed_model("gemma3", 128)
    ids = (km.document_ids(TEXT, None) * 2)[:300]
    prompt = km.prompt_ids(PROMPT, None)
    out = tmp_path / "w.kvz"
    write_kvz(km.prefill(ids), ids, out, km, levels=["lossless"], chunk_tokens=64, dtype="float32")
    got, first = first_forward_tokens(km, lambda: km.generate(ids + prompt, kv=load_kv(out).kv, max_new_tokens=12))
    assert got == km.generate(ids + prompt, max_new_tokens=12) and first == len(prompt)


def test_api_paths_on_a_windowed_file(windowed, tmp_path):
    km = windowed
    text = TEXT[:170]
    out = tmp_path / "a.kvz"
    api.encode(text, out, model=km, levels=["lossless", "balanced"], chunk_tokens=32,
               if_no_profile="uncalibrated")
    info = api.info(out)
    t = info["tokens"]
    assert info["format_version"] == "2.0" and not info["layout"]["dense"]
    by_type = {g["type"]: g for g in info["layout"]["by_type"]}
    assert by_type["sliding_attention"]["tokens_stored"] == 15
    if "full_attention" in by_type:
        assert by_type["full_attention"]["tokens_stored"] == t
    assert info["stored_elements"] == 2 * km.kv_heads * km.head_dim * sum(km.kept_positions(t))
    assert info["bits_per_context_element"] < info["bits_per_element"]
    assert api.verify(out).ok
    # decode: keys and values as the model's cache holds them, with their positions
    dec = tmp_path / "a.safetensors"
    api.decode(out, dec, level="lossless")
    tensors = load_file(dec)
    cache = km.build_cache(km.prefill(km.document_ids(text, None)))
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(tensors[f"layers.{i}.key"], layer.keys[0])
        torch.testing.assert_close(tensors[f"layers.{i}.value"], layer.values[0])
        pos = tensors[f"layers.{i}.positions"]
        assert pos.dtype == torch.int64 and pos.shape == layer.keys.shape[1:3]
        n = pos.shape[1]
        assert pos[0].tolist() == list(range(t - n, t))
    # generate from the lossy level runs and attaches the same layout
    res = api.generate(out, PROMPT, model=km, max_new_tokens=4, level="balanced")
    assert len(res.new_token_ids) == 4


def test_continuing_right_after_a_full_window_needs_a_new_token(tmp_path):
    km = windowed_model("mistral", 16)
    ids = km.document_ids(TEXT, None)[:60]
    with pytest.raises(errors.InputError, match="give a prompt"):
        km.generate(ids, kv=km.prefill(ids), max_new_tokens=2)
    # within the window the cache is dense and crops as before
    short = ids[:10]
    assert km.generate(short, kv=km.prefill(short), max_new_tokens=4) == km.generate(short, max_new_tokens=4)


def test_a_layout_the_model_cannot_hold_is_refused_before_decoding(tmp_path):
    km = windowed_model("gemma3", 16)
    other = windowed_model("gemma3", 32)  # same weights, another window: a different config
    ids = km.document_ids(TEXT, None)[:80]
    out = tmp_path / "x.kvz"
    write_kvz(km.prefill(ids), ids, out, km, levels=["lossless"], chunk_tokens=32, dtype="float32")
    with open_cache(out) as f:
        with pytest.raises(errors.ModelMismatchError):
            other.check_stored_cache(f.header)
    with pytest.raises(errors.ModelMismatchError, match="keeps the last"):
        km.check_layout(PositionLayout.from_counts([15] * 6, km.kv_heads, 80))  # the full layer too short


# ------------------------------------------------------------------- the format
def test_position_layout_round_trips_compactly():
    rng = np.random.default_rng(0)
    t = 1000
    pruned = [np.sort(rng.choice(t, 300, replace=False)).astype(np.int64) for _ in range(3)]
    window = np.arange(t - 15, t, dtype=np.int64)
    every = np.arange(t, dtype=np.int64)
    layout = PositionLayout([[every] * 3, [window] * 3, pruned, [np.zeros(0, np.int64)] * 3], t)
    again = PositionLayout.from_json(layout.to_json(), 4, 3, t)
    for a, b in zip(layout.positions, again.positions):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    raw = layout.to_bytes()
    assert len(raw) < 12 + 4 * 3 + 3 * (t // 8 + 1) + 40  # runs for the ranges, bitmaps for the rest
    assert not layout.is_dense() and PositionLayout.dense(2, 2, 9).is_dense()
    blocks = layout.blocks(0, t)
    assert [b.layers for b in blocks][:2] == [(0,), (1,)] and len(blocks) == 2 + 3


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw + b"\0", "after its last record"),
    (lambda raw: raw[:12] + b"\x07" + raw[13:], "unknown kind"),
    (lambda raw: raw[:12] + b"\x00" + raw[13:], "before the first"),
])
def test_broken_layouts_are_header_errors(damage, message):
    layout = PositionLayout.from_counts([10, 4], 2, 10)
    with pytest.raises(errors.HeaderError, match=message):
        PositionLayout.from_bytes(damage(layout.to_bytes()), 2, 2, 10)
    with pytest.raises(errors.HeaderError, match="describes"):
        PositionLayout.from_bytes(layout.to_bytes(), 3, 2, 10)


def _reseal_header(data: bytes, edit) -> bytes:
    """The file with its header edited and every checksum and offset made consistent."""
    from kvzip.formats import pack_index, pack_preamble, parse_index
    from kvzip.formats.container import Preamble, parse_preamble
    from kvzip.formats.spec import PREAMBLE_SIZE

    pre = parse_preamble(data)
    header = json.loads(data[PREAMBLE_SIZE : PREAMBLE_SIZE + pre.header_length])
    edit(header)
    new_header = encode_header(header)
    index_at = PREAMBLE_SIZE + pre.header_length
    entries = parse_index(data[index_at : index_at + pre.index_length])
    shift = len(new_header) - pre.header_length
    from dataclasses import replace

    entries = [replace(e, offset=e.offset + shift) for e in entries]
    index = pack_index(entries)
    preamble = Preamble(len(new_header), len(index), zlib.crc32(new_header), zlib.crc32(index),
                        PREAMBLE_SIZE + len(new_header) + len(index), pre.major, pre.minor, 0)
    return pack_preamble(preamble) + new_header + index + data[pre.data_offset :]


def test_unknown_feature_is_refused_by_name(tmp_path):
    km = windowed_model("gemma3", 16)
    ids = km.document_ids(TEXT, None)[:40]
    out = tmp_path / "f.kvz"
    write_kvz(km.prefill(ids), ids, out, km, levels=["lossless"], chunk_tokens=16, dtype="float32")
    data = out.read_bytes()
    assert KvzReader(BytesSource(data)).header.features == ("positions", "rope-tables")
    future = _reseal_header(data, lambda h: h["features"].append("ragged-heads-v9"))
    with pytest.raises(errors.UnsupportedVersionError, match="'ragged-heads-v9'"):
        KvzReader(BytesSource(future))
    as_v1 = bytearray(data)
    as_v1[8:10] = (1).to_bytes(2, "little")  # a 1.x reader would not know the layout: refused
    with pytest.raises(errors.FormatError):
        KvzReader(BytesSource(bytes(as_v1)))


def test_dense_files_stay_version_1(tiny_llama, tmp_path):
    ids = tiny_llama.document_ids(TEXT, None)[:50]
    out = tmp_path / "d.kvz"
    write_kvz(tiny_llama.prefill(ids), ids, out, tiny_llama, levels=["lossless"], chunk_tokens=16,
              dtype="float32")
    with open_cache(out) as f:
        assert f.version == (1, 0) and f.header.features == () and "positions" not in f.header.raw


# -------------------------------------------------------------------- streaming
def test_streaming_a_windowed_file(tmp_path):
    from kvzip.stream.client import RECOMPUTE, _chunk_elements, stream_generate
    from kvzip.stream.manifest import parse_manifest
    from kvzip.stream.server import create_app, serve_in_thread

    km = windowed_model("gemma3", 16)
    ids = km.document_ids(TEXT, None)[:120]
    root = tmp_path / "ctx"
    root.mkdir()
    write_kvz(km.prefill(ids), ids, root / "w.kvz", km, levels=["lossless", "balanced"],
              chunk_tokens=32, dtype="float32")
    prompt = km.prompt_ids(PROMPT, None)
    local = km.generate(ids + prompt, max_new_tokens=8)
    import httpx

    with serve_in_thread(create_app(root)) as url:
        manifest_url = url + "/contexts/w.kvz/manifest"
        data = httpx.get(manifest_url).json()
        # chunks before the window carry only the full layer; the last one every layer
        assert [c["layers"] for c in data["chunks"]] == [[5], [5], [5], [0, 1, 2, 3, 4, 5]]
        manifest = parse_manifest(data, manifest_url)
        elements = [_chunk_elements(manifest, c) for c in manifest.chunks]
        per = 2 * km.kv_heads * km.head_dim
        assert elements == [32 * per, 32 * per, 32 * per, (24 + 5 * 15) * per]
        streamed = stream_generate(manifest_url, PROMPT, km, levels=["lossless"], max_new_tokens=8)
        assert streamed.new_token_ids == local and streamed.levels == ["lossless"] * 4
        direct = stream_generate(url + "/w.kvz", PROMPT, km, levels=["lossless"], max_new_tokens=8)
        assert direct.new_token_ids == local
        # text fallback: every chunk recomputed from its token ids with the window before it
        redone = stream_generate(manifest_url, PROMPT, km, levels=[], max_new_tokens=8)
        assert redone.levels == [RECOMPUTE] * 4 and redone.bytes_fetched == 0
        assert redone.new_token_ids == local


# -------------------------------------------------------------------------- RAG
def test_rag_assembly_on_a_hybrid_model(tmp_path):
    from kvzip.store import CachedPassage, PassageStore, ask, assemble, precache

    km = windowed_model("gemma3", 64)  # passages must fit the 63 positions a sliding layer keeps
    tables, index = km.rope_tables()
    freqs = [tables[i] for i in index]
    parts = [km.encode_text(t, special_tokens=False) for t in (TEXT[:50], TEXT[50:105], TEXT[105:160])]
    cached = [CachedPassage(p, km.prefill(p).dense_array(), freqs) for p in parts]
    context, kv = assemble(km, [], cached)
    assert kv.shape[3] == sum(map(len, parts)) > 64
    question = km.prompt_ids(PROMPT, None)
    full = km.prefill(context)
    # everything recomputed with its real context: the full prefill's cache, windows included
    _, blended = assemble(km, [], cached, blend_fraction=1.0)
    torch.testing.assert_close(km.teacher_force(blended, question), km.teacher_force(full, question),
                               atol=1e-4, rtol=1e-4)
    # the recomputed window changes exactly the sliding layers' last 63 positions
    _, windowed = assemble(km, [], cached, recompute_window=True)
    t = kv.shape[3]
    sliding = [i for i, w in enumerate(km.layer_windows()) if w is not None]
    assert torch.equal(windowed[:, :, :, : t - 63], kv[:, :, :, : t - 63])
    assert torch.equal(windowed[:, 5], kv[:, 5])  # the full layer
    assert not torch.equal(windowed[:, sliding, :, t - 63 :], kv[:, sliding, :, t - 63 :])
    full_window = torch.stack([full.layers[i] for i in sliding], dim=1)
    err = lambda x: float((x[:, sliding, :, t - 63 :] - full_window).abs().mean())  # noqa: E731
    assert err(windowed) < err(kv)  # nearer the true window than the moved passages' keys
    # the store end to end: passages default to the window, ask attaches the assembled cache
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 2)
    with PassageStore(tmp_path / "s", create=True) as store:
        precache([doc], store, km, level="lossless")
        for recompute in (False, True):
            result = ask(store, "freedom software", km, top_k=3, max_new_tokens=4, recompute_window=recompute)
            assert len(result.new_token_ids) == 4 and result.context_tokens > 64
        # kept entries (precache --keep): assembled as a pruned cache, the windows cut to size
        precache([doc], store, km, level="lossless", keep=0.5, keep_by="prefill")
        for recompute in (False, True):
            result = ask(store, "freedom software", km, top_k=3, max_new_tokens=4, recompute_window=recompute,
                         keep=0.5, blend_recompute=0.2)
            assert len(result.new_token_ids) == 4 and result.context_tokens > 64
    with PassageStore(tmp_path / "t", create=True) as store, pytest.raises(errors.InputError, match="window"):
        precache([doc], store, km, passage_tokens=100, level="lossless")


def test_every_codec_codes_a_windowed_file(tmp_path):
    # cachegen's bins and kvzip-lossy's early layers follow the model's layers in every block
    from kvzip.codecs import codec_from_config

    km = windowed_model("gemma3", 16)
    ids = km.document_ids(TEXT, None)[:90]
    kv = km.prefill(ids)
    levels = [("cachegen", codec_from_config({"id": "cachegen", "key_early_layers": 5})),
              ("early", codec_from_config({"id": "kvzip-lossy", "early_layers": 5, "early_factor": 4.0}))]
    out = tmp_path / "c.kvz"
    write_kvz(kv, ids, out, km, levels=levels, chunk_tokens=32, dtype="float32")
    for name, _ in levels:
        got = load_kv(out, name).kv
        for a, b in zip(got.layers, kv.layers):
            assert a.shape == b.shape
            assert float((a - b).abs().mean()) < 0.2 * float(b.abs().mean())


def test_a_layout_that_would_not_fit_in_memory_is_refused(monkeypatch):
    # Alternating records (no sharing) of one long run each: a few bytes per record that
    # stand for every position; refused by the memory limit before they are materialised.
    from kvzip.formats import limits

    t, layers, heads = 1 << 20, 64, 8
    a = np.arange(t, dtype=np.int64)
    b = a[1:]
    layout = PositionLayout([[a if (i + h) % 2 else b for h in range(heads)] for i in range(layers)], t)
    data = layout.to_bytes()
    assert len(data) < 12 + layers * heads * 12
    monkeypatch.setattr(limits, "memory_limit", lambda: 1 << 30)
    with pytest.raises(errors.MemoryLimitError, match="position layout"):
        PositionLayout.from_bytes(data, layers, heads, t)
