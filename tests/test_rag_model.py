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
    full = real_model.prefill(context).dense
    question = real_model.encode_text("\n\nWhat is granted?", special_tokens=False)
    torch.testing.assert_close(
        real_model.teacher_force(kv, question), real_model.teacher_force(full, question), atol=1e-4, rtol=1e-4
    )


def test_layer_0_of_a_moved_passage_matches_a_prefill_at_its_offset(real_model, filled):
    with PassageStore(filled) as store:
        level, hits = retrieve(store, "patent license grant", real_model, top_k=1)
        passage = load_passage(store, hits[0], real_model, level)
    other = real_model.encode_text("An unrelated opening sentence, to shift positions.", special_tokens=False)
    after = real_model.prefill(other + passage.token_ids).dense[:, :, :, len(other) :]
    moved = move_kv(passage.kv, len(other), passage.layer_freqs)
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


def test_stored_opening_is_a_fresh_prefill_and_leaves_the_answer_unchanged(real_model, filled):
    from kvzip.store.opening import forget_openings, load_opening, opening_ids

    question = "What patent license does a contributor grant?"
    before, after = prompt_ids(real_model, question)
    assert before == opening_ids(real_model) and len(before) > 10  # the chat template's opening
    with PassageStore(filled) as store:
        forget_openings()
        stored, source = load_opening(real_model, before, store)
        assert source == "store"
        torch.testing.assert_close(stored, real_model.prefill(before).dense, atol=0, rtol=0)
        forget_openings()
        cached = ask(store, question, real_model, top_k=2, max_new_tokens=8, compare=False)
        forget_openings()
        store.index.remove_opening(store.index.opening_names()[0])
        fresh = ask(store, question, real_model, top_k=2, max_new_tokens=8, compare=False)
    assert (cached.opening_source, fresh.opening_source) == ("store", "prefill")
    assert cached.new_token_ids == fresh.new_token_ids
    forget_openings()


def test_one_pass_recompute_on_the_real_model(real_model, filled):
    with PassageStore(filled) as store:
        level, hits = retrieve(store, "patent license grant", real_model, top_k=3)
        passages = [load_passage(store, h, real_model, level) for h in hits]
    before, after = prompt_ids(real_model, "What is granted?")
    kv = real_model.prefill(before).dense
    context = list(before)
    for p in passages:  # passage by passage, as before the one-pass recompute
        redo = -(-len(p.token_ids) // 10)
        kv = real_model.extend(kv, p.token_ids[:redo]).dense
        kv = torch.cat([kv, move_kv(p.kv[:, :, :, redo:], len(context), p.layer_freqs)], dim=3)
        context += p.token_ids
    same, one_pass = assemble(real_model, before, passages, blend_fraction=0.1)
    assert same == context
    torch.testing.assert_close(one_pass, kv, atol=2e-3, rtol=1e-3)
