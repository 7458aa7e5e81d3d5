"""Integration tests on the embedded default model (SmolLM2-135M-Instruct, GGUF).

The model loads once per session (~20-40 s on a 2-core CPU); each test prefills
only a few hundred tokens to keep the suite quick.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvzip import api
from kvzip.errors import ModelMismatchError

pytestmark = pytest.mark.model

LICENSE = Path("/usr/share/common-licenses/Apache-2.0")


@pytest.fixture(scope="module")
def doc_text() -> str:
    # About 700 tokens of a real document no one on the project wrote.
    return LICENSE.read_text()[:3000]


def test_default_model_geometry(real_model):
    assert real_model.identity()["architecture"] == "llama"
    assert (real_model.num_layers, real_model.kv_heads, real_model.head_dim) == (30, 3, 64)
    assert real_model.rope_inv_freq() is not None


def test_lossless_generate_is_token_identical_to_generating_from_text(
    real_model, doc_text, tmp_path
):
    out = tmp_path / "doc.kvz"
    summary = api.encode(doc_text, out, model=real_model, levels=["lossless"], chunk_tokens=128)
    assert summary.tokens > 500 and summary.chunks == -(-summary.tokens // 128)
    loaded = api.load_kv(out)
    prompt = "\n\nIn short, this license"
    result = api.generate(out, prompt, model=real_model, max_new_tokens=24, compare=True)
    assert result.baseline_identical is True
    # And the decoded cache is bit-identical to a fresh capture.
    ids = real_model.document_ids(doc_text, None)
    assert loaded.token_ids == ids
    assert torch.equal(loaded.kv.dense, real_model.prefill(ids).dense)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lossless_reduced_dtype_is_bit_exact(real_model, doc_text, tmp_path, dtype):
    out = tmp_path / f"doc-{dtype}.kvz"
    api.encode(doc_text[:800], out, model=real_model, levels=["lossless"], dtype=dtype)
    loaded = api.load_kv(out)
    ids = real_model.document_ids(doc_text[:800], None)
    expected = real_model.prefill(ids).dense.to(getattr(torch, dtype))
    assert loaded.kv.dense.dtype == expected.dtype
    assert torch.equal(loaded.kv.dense.view(torch.int16), expected.view(torch.int16))


def test_chat_file_answers_a_question_about_the_document(real_model, tmp_path):
    text = LICENSE.read_text()[:1500]
    out = tmp_path / "chat.kvz"
    api.encode(text, out, model=real_model, chat=True)
    result = api.generate(
        out, "Who publishes this license?", model=real_model, max_new_tokens=30
    )
    assert "Apache" in result.text


def test_file_from_another_model_is_refused(real_model, tmp_path):
    from tiny import tiny_model

    out = tmp_path / "tiny.kvz"
    api.encode("A short document for a tiny model.", out, model=tiny_model("llama"))
    with pytest.raises(ModelMismatchError, match="does not match"):
        api.generate(out, "Hello", model=real_model, max_new_tokens=2)


def test_lossy_levels_keep_the_model_close(real_model, doc_text, tmp_path):
    """Teacher-forced continuation after a decoded cache stays close to the original."""
    from kvzip.bench import score
    from kvzip.levels import load_kv, write_kvz

    ids = real_model.document_ids(doc_text, None)
    P, C = 400, 150
    assert len(ids) > P + C + 1
    kv = real_model.prefill(ids[:P]).dense
    ref = real_model.teacher_force(kv, ids[P : P + C])
    targets = torch.tensor(ids[P + 1 : P + C + 1])
    results = {}
    for level in ("small", "balanced", "high"):
        out = tmp_path / f"{level}.kvz"
        write_kvz(kv, ids[:P], out, real_model, levels=[level], chunk_tokens=256, dtype="float32")
        got = real_model.teacher_force(load_kv(out).kv.dense, ids[P : P + C])
        results[level] = (out.stat().st_size * 8 / kv.numel(), score(ref, got, targets).kl)
    # Short contexts pay relatively more for headers; the protocol's numbers are in docs/benchmarks.md.
    assert results["small"][0] < results["balanced"][0] < results["high"][0] < 5.0
    assert results["high"][1] < results["balanced"][1] < results["small"][1] < 0.08
    assert results["balanced"][1] < 0.02


def test_a_gguf_is_parsed_once_per_load(real_model_load):
    """transformers reads a .gguf three times to load it (config, tokenizer, tensors); the
    loader hands every call the same parsed reader."""
    import gguf

    km, made = real_model_load
    assert len(made) == 1 and made[0].endswith(".gguf")
    assert gguf.GGUFReader.__name__ == "GGUFReader"  # put back after the load
    assert km.encode_text("Apache License", special_tokens=False) and km.num_layers == 30
