"""Importance: recording attention inside the model, the scorers, and codecs that spend
their step by importance class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT
from tiny import tiny_model, windowed_model

from kvzip import api, errors, importance
from kvzip.codecs import ChunkContext, codec_from_config
from kvzip.model.attention import AttentionRecorder, recording


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: windowed_model("gemma3", 16),
                                  lambda: windowed_model("gpt_oss", 16)], ids=["llama", "gemma3", "gpt_oss"])
def test_recording_attention_computes_what_the_model_computes(make):
    km = make()
    ids = list(range(40, 140))
    ref = km.teacher_force(km.prefill(ids[:1]), ids[1:])
    recorder = AttentionRecorder(km.num_layers, km.kv_heads, len(ids))
    with recording(km.model, recorder):
        got = km.teacher_force(km.prefill(ids[:1]), ids[1:])
        assert km.model.config._attn_implementation == "kvzip-record"
    assert km.model.config._attn_implementation != "kvzip-record"  # switched back
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_recording_reuses_its_buffers_across_forwards_of_any_size():
    km = tiny_model("llama")
    texts = [list(range(40, 140)), list(range(50, 70)), list(range(60, 160))]  # larger, smaller, larger
    refs = [km.teacher_force(km.prefill(ids[:1]), ids[1:]) for ids in texts]
    with recording(km.model, AttentionRecorder(km.num_layers, km.kv_heads, 100)):
        got = [km.teacher_force(km.prefill(ids[:1]), ids[1:]) for ids in texts]
    for g, r in zip(got, refs):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_recorded_scores_are_the_largest_attention_weights():
    km = tiny_model("llama")
    ids = list(range(40, 90))
    km.model.set_attn_implementation("eager")
    try:
        out = km.model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        km.model.set_attn_implementation("sdpa")
    recorder = AttentionRecorder(km.num_layers, km.kv_heads, len(ids))
    with recording(km.model, recorder):
        km.prefill(ids, step=17)  # in pieces: the recorder places each piece's keys right
    groups = km.model.config.num_attention_heads // km.kv_heads
    for layer, weights in enumerate(out.attentions):
        want = weights[0].reshape(km.kv_heads, groups, len(ids), len(ids)).amax(dim=(1, 2))
        np.testing.assert_allclose(recorder.result()[layer], want.detach().numpy(), atol=1e-5)


def test_scorers_score_every_stored_entry():
    km = windowed_model("gemma3", 16)
    ids = km.document_ids(TEXT, None)[:120]
    for name in importance.SCORERS:
        scored = importance.score(km, ids, name)
        assert [s.shape for s in scored.scores] == [tuple(layer.shape[1:3]) for layer in scored.kv.layers]
        assert all(np.isfinite(s).all() for s in scored.scores) and scored.seconds > 0
    cls = importance.classes(importance.score(km, ids, "prefill").scores)
    full = cls[5]  # the full layer: 120 entries per head
    assert [int((full[0] == c).sum()) for c in range(4)] == [6, 18, 36, 60]
    with pytest.raises(errors.InputError, match="unknown importance scorer"):
        importance.scorer("magic")


def test_reconstruct_scores_the_context_from_the_repeat_only():
    km = tiny_model("llama")
    ids = km.document_ids(TEXT, None)[:120]
    scored = importance.score(km, ids, "reconstruct")
    assert all((s > 0).all() and float(s.max()) <= 1.0 for s in scored.scores)  # every entry seen
    # the prefill's own queries are not counted: position 0's weight of 1 from query 0 is absent
    assert all(float(s[:, 0].max()) < 1.0 for s in scored.scores)
    assert importance.score(km, ids, "prefill").kv.token_count == len(ids)


def _ctx(classes=None):
    return ChunkContext(0, 32, 2, 2, 8, "float32", importance=classes)


def test_importance_factors_scale_the_step_per_entry():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 2, 32, 8)).astype(np.float32)
    plain = codec_from_config({"id": "kvzip-lossy", "key_step": 0.5, "value_step": 0.5, "entropy": "rans"})
    weighted = codec_from_config({"id": "kvzip-lossy", "key_step": 0.5, "value_step": 0.5, "entropy": "rans",
                                  "importance_factors": [0.25, 1.0, 4.0]})
    assert "importance_factors" not in plain.config()
    same = weighted.decode(weighted.encode(x, _ctx()), _ctx())  # nobody scored: every entry class 1
    np.testing.assert_array_equal(same, plain.decode(plain.encode(x, _ctx()), _ctx()))
    cls = np.zeros((2, 2, 32), np.uint8)
    cls[:, :, 16:] = 2
    got = weighted.decode(weighted.encode(x, _ctx(cls)), _ctx())  # classes travel in the payload
    err = np.abs(got - x)
    assert err[:, :, :, 4:16].max() < 0.25 * err[:, :, :, 16:].max()
    with pytest.raises(errors.CodecError, match="importance_factors"):
        codec_from_config({"id": "kvzip-lossy", "importance_factors": [0.5, 2.0]})  # no class of factor 1
    payload = bytearray(weighted.encode(x, _ctx(cls)))
    with pytest.raises(errors.CodecError):
        weighted.decode(bytes(payload[:-3]), _ctx())


def test_encode_with_importance(tmp_path, tiny_model_dir):
    from kvzip.levels import open_cache

    km = api.load_model(str(tiny_model_dir))
    out, plain = tmp_path / "i.kvz", tmp_path / "p.kvz"
    api.encode(TEXT, plain, model=km, levels=["balanced"], if_no_profile="uncalibrated", importance="none")
    api.encode(TEXT, out, model=km, levels=["lossless", "balanced"], if_no_profile="uncalibrated",
               importance="prefill")
    with open_cache(out) as f:
        assert f.header.raw["importance"]["scorer"] == "prefill"
        assert f.header.levels[1].codec["importance_factors"] == list(importance.DEFAULT_FACTORS)
        assert "importance_factors" not in f.header.levels[0].codec  # lossless codes every entry alike
    assert api.verify(out).ok
    info = api.info(out)
    size = info["levels"][1]["payload_bytes"]
    assert 0.9 < size / api.info(plain)["levels"][0]["payload_bytes"] < 1.1  # about the level's size
    # info splits the payload by class, as the entropy coder's own models price the symbols
    assert info["levels"][0]["importance_classes"] is None
    assert api.info(plain)["levels"][0]["importance_classes"] is None
    classes = info["levels"][1]["importance_classes"]
    assert [c["step_factor"] for c in classes] == list(importance.DEFAULT_FACTORS)
    assert sum(c["elements"] for c in classes) == info["stored_elements"]
    for c, share in zip(classes, importance.DEFAULT_SHARES):
        assert abs(c["share"] - share) < 0.05
    coded = sum(c["elements"] * c["bits_per_element"] for c in classes)
    assert 0.8 * size * 8 < coded < size * 8  # the rest: side info and framing
    by_factor = sorted(classes, key=lambda c: c["step_factor"])
    assert by_factor[0]["bits_per_element"] > by_factor[1]["bits_per_element"] > by_factor[2]["bits_per_element"]
    res = api.generate(out, " and", model=km, max_new_tokens=3, level="balanced")
    assert len(res.new_token_ids) == 3
    with pytest.raises(errors.InputError, match="unknown importance scorer"):
        api.encode(TEXT, tmp_path / "x.kvz", model=km, importance="magic")
    assert not (tmp_path / "x.kvz").exists()


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: windowed_model("gemma3", 16)],
                         ids=["llama", "gemma3"])
def test_reconstruction_pieces_each_see_the_context_and_themselves_only(make):
    """KVzip's chunked scoring: a piece read after another scores the context exactly as it
    would alone, so the cache is put back between pieces (sliding layers too)."""
    km = make()
    ids = list(range(40, 120))
    kv = km.prefill(ids)
    a, b = list(range(60, 90)), list(range(130, 150))

    def scores(pieces):
        rec = AttentionRecorder(km.num_layers, km.kv_heads, len(ids), start=len(ids), record_from=len(ids))
        with recording(km.model, rec):
            km.read_pieces_after(kv, pieces, before_each=lambda: rec.rewind(len(ids)))
        return rec.result()

    both = scores([a, b])
    alone = [np.maximum(x, y) for x, y in zip(scores([a]), scores([b]))]
    for x, y in zip(both, alone):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert any(not np.allclose(x, y) for x, y in zip(scores([a]), scores([b])))  # the pieces differ
