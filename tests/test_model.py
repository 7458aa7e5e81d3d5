"""Model layer on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT
from tiny import FAMILIES, tiny_config, tiny_model

from kvzip.errors import (
    ContextTooLongError,
    EmptyTextError,
    ModelMismatchError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from kvzip.model import KVModel, check_architecture, resolve_model


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


def test_prefill_captures_every_layer_like_one_forward_pass(family_model):
    km = family_model
    ids = km.document_ids(TEXT, None)
    kv = km.prefill(ids, step=37).dense  # odd step: pieces do not align with anything
    assert kv.shape == (2, km.num_layers, km.kv_heads, len(ids), km.head_dim)
    with torch.inference_mode():
        cache = km.model(torch.tensor([ids]), use_cache=True).cache
    ref = km.cache_to_tensor(cache, len(ids))
    torch.testing.assert_close(kv, ref, rtol=1e-4, atol=1e-5)


def test_generate_from_cache_matches_generate_from_text(family_model):
    km = family_model
    chat = km.chat_template()
    doc = km.document_ids(TEXT, chat)
    ids = doc + km.prompt_ids("What jumps?", chat)
    kv = km.prefill(doc).dense
    assert km.generate(ids, kv=kv, max_new_tokens=12) == km.generate(ids, max_new_tokens=12)


def test_cache_covering_every_token_is_cropped_by_one(tiny_llama):
    ids = tiny_llama.document_ids(TEXT, None)
    kv = tiny_llama.prefill(ids).dense
    assert tiny_llama.generate(ids, kv=kv, max_new_tokens=5) == tiny_llama.generate(
        ids, max_new_tokens=5
    )


def test_chat_template_splits_around_document_and_question(tiny_llama):
    chat = tiny_llama.chat_template()
    assert chat is not None
    rendered = tiny_llama.tokenizer.apply_chat_template(
        [{"role": "user", "content": "DOC" + "\n\n" + "Q?"}], tokenize=False,
        add_generation_prompt=True,
    )
    assert chat.prefix + "DOC" + chat.separator + "Q?" + chat.suffix == rendered
    assert chat.suffix.endswith("assistant\n")


def test_rope_frequencies_are_exposed_for_plain_rope():
    km = tiny_model("llama")
    inv = km.rope_inv_freq()
    assert inv is not None and len(inv) == km.head_dim // 2
    assert inv[0] == pytest.approx(1.0)


def test_gemma3_per_layer_rope_is_not_claimed_uniform():
    # Gemma 3 rotates local and global layers with different bases: one table per layer type.
    km = tiny_model("gemma3")
    assert km.rope_inv_freq() is None
    tables, index = km.rope_tables()
    assert len(tables) == 2 and index == (0, 0, 1)
    rotary = km.model.model.rotary_emb
    assert tables[1] == tuple(rotary.full_attention_inv_freq.double().tolist())


def test_context_longer_than_model_is_refused(tiny_llama):
    with pytest.raises(ContextTooLongError, match="context of 512"):
        tiny_llama.prefill(list(range(600)))


def test_empty_text_is_refused(tiny_llama):
    with pytest.raises(EmptyTextError):
        tiny_llama.document_ids("  \n\t ", None)


def test_fingerprint_tracks_weights_and_tokenizer():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert a.identity() == b.identity()
    assert a.identity()["weights_sha256"] != c.identity()["weights_sha256"]
    assert a.identity()["config_sha256"] == c.identity()["config_sha256"]
    a.check_identity(b.identity())
    with pytest.raises(ModelMismatchError, match="weights"):
        a.check_identity(c.identity())
    qwen = tiny_model("qwen2")
    with pytest.raises(ModelMismatchError, match="architecture config"):
        a.check_identity(qwen.identity())


def test_recurrent_model_is_refused():
    import transformers as tf

    with pytest.raises(UnsupportedModelError, match="recurrent"):
        check_architecture(tf.MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2))


def test_latent_attention_model_is_refused():
    import transformers as tf

    cfg = tf.DeepseekV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, kv_lora_rank=8)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        check_architecture(cfg)


def test_hybrid_model_is_refused():
    cfg = tiny_config("llama")
    cfg.layer_types = ["full_attention", "linear_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        check_architecture(cfg)


def test_model_directory_loads_and_matches(tiny_model_dir):
    km = KVModel.load(str(tiny_model_dir))
    assert km.identity()["weights_sha256"] == tiny_model("llama").identity()["weights_sha256"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/nonexistent/model.gguf", "not found"),
        ("./no/such/dir", "not found"),
        ("org/name/extra", "not found"),
    ],
)
def test_missing_local_models_are_reported(spec, message):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(spec)


def test_directory_without_config_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        KVModel.load("kvzip-test/definitely-not-cached-model")


def test_a_current_file_attaches_without_hashing_the_weights_a_second_way(tiny_model_dir, tmp_path):
    """The legacy fingerprint (weights in their loaded dtype) is computed only for a file
    that does not carry the current one; the tokenizer is hashed once per model."""
    from kvzip import api
    from kvzip.formats import open_kvz

    out = tmp_path / "a.kvz"
    api.encode(TEXT, out, model=str(tiny_model_dir), levels=["lossless"])
    km = KVModel.load(str(tiny_model_dir))
    with open_kvz(out) as r:
        km.check_stored_cache(r.header)
        assert km._legacy_identity is None
        forged = {**r.header.model.to_json(), "fingerprint": "0" * 64}
    with pytest.raises(ModelMismatchError):
        km.check_identity(forged)  # now both are compared
    assert km._legacy_identity is not None
    assert km.tokenizer_fingerprint() is km.tokenizer_fingerprint()
