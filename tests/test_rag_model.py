"""RAG on the real embedded model (SmolLM2-135M-Instruct): exactness where it must hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvzip.store import PassageStore, ask, assemble, fidelity, move_kv, precache, prompt_ids
from kvzip.store.ask import load_passage, retrieve

pytestmark = pytest.mark.model

LICENSE = Path("/usr/share/common-licenses/Apache-2.0")


@pytest.fixture(scope="module")
def filled(real_model, tmp_path_factory):
    if not LICENSE.is_file():
        pytest.skip(f"{LICENSE} is not on this machine")
    root = tmp_path_factory.mktemp("rag-real")
    (root / "apache.txt").write_text(LICENSE.read_text()[:3000])
    with PassageStore(root / "store", create=True) as store:
        precache([root / "apache.txt"], store, real_model, passage_tokens=160, level="lossless")
    return root / "store"


def test_single_passage_at_position_0_is_prefix_reuse(real_model, filled):
    with PassageStore(filled) as store:
        level, hits = retrieve(store, "patent license grant", real_model, top_k=1)
        passage = load_passage(store, hits[0], real_model, level)
    context, kv = assemble(real_model, [], [passage])
    full = real_model.prefill(context)
    question = real_model.encode_text("\n\nWhat is granted?", special_tokens=False)
    torch.testing.assert_close(
        real_model.teacher_force(kv, question), real_model.teacher_force(full, question), atol=1e-4, rtol=1e-4
    )


def test_layer_0_of_a_moved_passage_matches_a_prefill_at_its_offset(real_model, filled):
    with PassageStore(filled) as store:
        level, hits = retrieve(store, "patent license grant", real_model, top_k=1)
        passage = load_passage(store, hits[0], real_model, level)
    other = real_model.encode_text("An unrelated opening sentence, to shift positions.", special_tokens=False)
    after = real_model.prefill(other + passage.token_ids)[:, :, :, len(other) :]
    moved = move_kv(passage.kv, len(other), passage.inv_freq)
    torch.testing.assert_close(moved[:, 0], after[:, 0], atol=1e-4, rtol=1e-4)


def test_ask_and_fidelity(real_model, filled):
    with PassageStore(filled) as store:
        result = ask(store, "What patent license does a contributor grant?", real_model, top_k=2, max_new_tokens=8)
        level, hits = retrieve(store, "patent license grant", real_model, top_k=2)
        passages = [load_passage(store, h, real_model, level) for h in hits]
    assert result.answer.strip() and len(result.sources) == 2
    assert result.baseline_first_token_seconds > 0
    before, after = prompt_ids(real_model, "What is granted?")
    context, exact = assemble(real_model, before, passages, blend_fraction=1.0)
    assert fidelity(real_model, context, exact, after, max_new_tokens=8).kl_nats_per_token < 1e-3
