"""Retrieval-augmented generation: moving passage caches, assembling prompts, ``ask``, Ray."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from kvzip.cli import ask as ask_cli
from kvzip.cli import precache as precache_cli
from kvzip.cli import store as store_cli
from kvzip.errors import InputError, UnsupportedModelError
from kvzip.model import KVModel
from kvzip.store import (
    CachedPassage,
    PassageStore,
    ask,
    assemble,
    fidelity,
    move_kv,
    precache,
    prompt_ids,
    rotate_keys,
)
from kvzip.store.ask import load_passage, load_passages, retrieve
from kvzip.store.opening import forget_openings, load_opening, opening_ids, opening_name, read_opening

app = typer.Typer()
for module in (precache_cli, ask_cli, store_cli):
    module.register(app)
runner = CliRunner()

TEXT = (
    "The lighthouse keeper climbed the stairs at dusk. He lit the lamp and watched the ships.\n\n"
    "Storms came from the west in winter; the keeper logged each one in a leather book.\n\n"
)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvzip: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def km(tiny_model_dir) -> KVModel:
    return KVModel.load(str(tiny_model_dir))


def ids_of(km: KVModel, text: str) -> list[int]:
    return km.encode_text(text, special_tokens=False)


# ------------------------------------------------------------ key re-rotation
def test_rotation_algebra(km):
    inv_freq = km.rope_inv_freq()
    keys = torch.randn(3, 2, 40, km.head_dim, dtype=torch.float64)
    there = rotate_keys(keys, 100, inv_freq)
    torch.testing.assert_close(rotate_keys(rotate_keys(keys, 37, inv_freq), 63, inv_freq), there)
    torch.testing.assert_close(rotate_keys(there, -100, inv_freq), keys)
    torch.testing.assert_close(there.norm(dim=-1), keys.norm(dim=-1))  # a rotation
    assert rotate_keys(keys, 0, inv_freq) is keys


def test_rotating_by_delta_is_rope_at_the_new_position(km):
    """R(delta) applied to RoPE(x, p) equals RoPE(x, p + delta), with transformers' own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, km.kv_heads, 30, km.head_dim)
    rope = km.model.model.rotary_emb

    def embed(start: int) -> torch.Tensor:
        cos, sin = rope(x, torch.arange(start, start + 30)[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[1]

    torch.testing.assert_close(rotate_keys(embed(0), 211, km.rope_inv_freq()), embed(211), atol=2e-5, rtol=1e-5)


def test_moved_passage_matches_prefill_after_other_text_in_layer_0(km):
    other, passage = ids_of(km, "Some unrelated opening words. "), ids_of(km, TEXT)
    alone = km.prefill(passage).dense
    after = km.prefill(other + passage).dense[:, :, :, len(other) :]
    moved = move_kv(alone, len(other), [km.rope_inv_freq()] * km.num_layers)
    # Layer 0 sees only each token's own embedding: keys and values match exactly...
    torch.testing.assert_close(moved[:, 0], after[:, 0], atol=1e-5, rtol=1e-5)
    # ...deeper layers legitimately differ: there the passage attended to the opening.
    assert not torch.allclose(moved[:, 1:], after[:, 1:], atol=1e-3)


# ---------------------------------------------------------------- assembling
def test_a_single_passage_at_position_0_is_prefix_reuse(km, tmp_path):
    """Through the store at lossless: identical logits to a full prefill of the same ids."""
    (tmp_path / "doc.txt").write_text(TEXT)
    with PassageStore(tmp_path / "s", create=True) as store:
        precache([tmp_path / "doc.txt"], store, km, passage_tokens=512, level="lossless")
        level, hits = retrieve(store, "lighthouse keeper", km, top_k=1)
        passage = load_passage(store, hits[0], km, level)
    context, kv = assemble(km, [], [passage])
    question = ids_of(km, "\n\nWho lit the lamp?")
    full = km.prefill(context).dense
    torch.testing.assert_close(kv, full, atol=0, rtol=0)
    torch.testing.assert_close(km.teacher_force(kv, question), km.teacher_force(full, question), atol=1e-6, rtol=1e-6)


def test_assembly_places_passages_after_the_prefix(km):
    prefix = ids_of(km, "<|im_start|>user\n")
    parts = [ids_of(km, TEXT), ids_of(km, "A second, shorter passage. ")]
    cached = [CachedPassage(p, km.prefill(p).dense, [km.rope_inv_freq()] * km.num_layers) for p in parts]
    context, kv = assemble(km, prefix, cached)
    assert context == prefix + parts[0] + parts[1] and kv.shape[3] == len(context)
    full = km.prefill(context).dense
    torch.testing.assert_close(kv[:, :, :, : len(prefix)], full[:, :, :, : len(prefix)])
    torch.testing.assert_close(kv[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)  # layer 0: exact
    # Recomputing every passage token with its real context is a full prefill again.
    _, blended = assemble(km, prefix, cached, blend_fraction=1.0)
    torch.testing.assert_close(blended, full, atol=1e-5, rtol=1e-5)
    # A partial recompute fixes exactly the first tokens of each passage.
    _, partial = assemble(km, prefix, cached, blend_fraction=0.25)
    first = len(prefix) + len(parts[0])
    redo = -(-len(parts[1]) // 4)
    torch.testing.assert_close(partial[:, :, :, : len(prefix) + 1], full[:, :, :, : len(prefix) + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(partial[:, 1:, :, first : first + redo], kv[:, 1:, :, first : first + redo])


def test_fidelity_against_full_prefill(km):
    before, after = prompt_ids(km, "Who lit the lamp?")
    parts = [ids_of(km, TEXT), ids_of(km, "Storm logs were kept in leather. ")]
    cached = [CachedPassage(p, km.prefill(p).dense, [km.rope_inv_freq()] * km.num_layers) for p in parts]
    context, exact = assemble(km, before, cached, blend_fraction=1.0)
    same = fidelity(km, context, exact, after, max_new_tokens=6)
    assert same.kl_nats_per_token < 1e-6 and same.greedy_agreement == 1.0
    _, reused = assemble(km, before, cached)
    moved = fidelity(km, context, reused, after, max_new_tokens=6)
    assert moved.kl_nats_per_token > same.kl_nats_per_token and moved.answer_tokens == 6


def sequential_blend(km, prefix, cached, fraction):
    """The recompute as it was done before the one-pass version: passage by passage."""
    import math

    ids, kv = list(prefix), km.prefill(prefix).dense
    for p in cached:
        redo = math.ceil(fraction * len(p.token_ids))
        kv = km.extend(kv, p.token_ids[:redo]).dense
        kv = torch.cat([kv, move_kv(p.kv[:, :, :, redo:], len(ids), p.layer_freqs)], dim=3)
        ids += p.token_ids
    return ids, kv


def test_one_pass_recompute_equals_recomputing_passage_by_passage(km):
    prefix = ids_of(km, "<|im_start|>user\n")
    parts = [ids_of(km, TEXT), ids_of(km, "A second, shorter passage. "), ids_of(km, "Storms came from the west.")]
    cached = [CachedPassage(p, km.prefill(p).dense, [km.rope_inv_freq()] * km.num_layers) for p in parts]
    for fraction in (0.3, 1.0):
        ids, one_pass = assemble(km, prefix, cached, blend_fraction=fraction)
        same_ids, step_by_step = sequential_blend(km, prefix, cached, fraction)
        assert ids == same_ids
        torch.testing.assert_close(one_pass, step_by_step, atol=1e-5, rtol=1e-5)


def test_extend_at_consecutive_positions_is_extend(km):
    context, more = ids_of(km, TEXT), ids_of(km, "Who lit the lamp?")
    kv = km.prefill(context).dense
    at = km.extend_at(kv, more, range(len(context), len(context) + len(more)))
    torch.testing.assert_close(at, km.extend(kv, more).dense[:, :, :, len(context) :], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="one position"):
        km.extend_at(kv, more, [0])


def test_tokenize_with_offsets(km):
    ids, offsets = km.tokenize_with_offsets(TEXT)
    assert ids == ids_of(km, TEXT) and len(offsets) == len(ids)
    assert "".join(TEXT[a:b] for a, b in offsets).split() == TEXT.split()


def test_the_opening_is_stored_once_and_equals_a_fresh_prefill(km, tmp_path):
    (tmp_path / "doc.txt").write_text(TEXT)
    forget_openings()
    with PassageStore(tmp_path / "s", create=True) as store:
        precache([tmp_path / "doc.txt"], store, km, passage_tokens=512, level="lossless")
        before, after = prompt_ids(km, "Who lit the lamp?")
        assert before == opening_ids(km) and before
        name = opening_name(km, before)
        assert store.index.opening_names() == [name]
        # Exactly the cache a prefill of those tokens (at positions 0..n-1) gives.
        stored = read_opening(store.index.opening(name), km, before)
        torch.testing.assert_close(stored, km.prefill(before).dense, atol=0, rtol=0)
        forget_openings()
        kv, source = load_opening(km, before, store)
        assert source == "store" and torch.equal(kv, stored)
        assert load_opening(km, before, store)[1] == "memory"
        # ask reads it instead of prefilling it, and answers exactly as with a fresh prefill.
        forget_openings()
        cached = ask(store, "Who lit the lamp?", km, top_k=1, max_new_tokens=6, compare=False)
        assert cached.opening_source == "store"
        store.index.remove_opening(name)
        forget_openings()
        fresh = ask(store, "Who lit the lamp?", km, top_k=1, max_new_tokens=6, compare=False)
        assert fresh.opening_source == "prefill" and fresh.new_token_ids == cached.new_token_ids
        # A rerun of precache stores it again, and only once.
        precache([tmp_path / "doc.txt"], store, km, passage_tokens=512, level="lossless")
        assert store.index.opening_names() == [name]
        # Moving the passages after the stored opening: the same cache as prefilling it here.
        level, hits = retrieve(store, "lighthouse keeper", km, top_k=1)
        passages = load_passages(store, hits, km, level)
        _, with_stored = assemble(km, before, passages, prefix_kv=stored)
        _, with_fresh = assemble(km, before, passages)
        torch.testing.assert_close(with_stored, with_fresh, atol=0, rtol=0)


def test_a_damaged_opening_is_recomputed_and_verify_reports_it(km, tmp_path):
    (tmp_path / "doc.txt").write_text(TEXT)
    with PassageStore(tmp_path / "s", create=True) as store:
        precache([tmp_path / "doc.txt"], store, km, passage_tokens=512, level="lossless")
        before = opening_ids(km)
        name = opening_name(km, before)
        data = bytearray(store.index.opening(name))
        data[-10] ^= 0xFF
        store.index.add_opening(name, km.identity()["fingerprint"], km.dtype, "x", len(before), bytes(data))
        forget_openings()
        kv, source = load_opening(km, before, store)
        assert source == "prefill"
        torch.testing.assert_close(kv, km.prefill(before).dense, atol=0, rtol=0)
        report = store.verify()
    assert not report.ok and any(p.startswith(f"opening {name}") for p in report.problems)


# ----------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def filled_store(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rag")
    (root / "docs").mkdir()
    (root / "docs" / "lighthouse.txt").write_text(TEXT * 2)
    (root / "docs" / "more.jsonl").write_text(
        json.dumps({"id": "bees", "text": "Bees dance to tell the hive where flowers are."}) + "\n"
    )
    result = run("precache", root / "docs", "--store", root / "store", "--model", tiny_model_dir,
                 "--passage-tokens", 128, "--level", "lossless", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["documents"] == 2 and summary["cached"] == summary["unique_passages"]
    return root / "store"


def test_ask_end_to_end(filled_store, tiny_model_dir):
    result = run("ask", "Where do bees find flowers?", "--store", filled_store, "--model", tiny_model_dir,
                 "--top-k", 2, "--max-new-tokens", 4, "--blend-recompute", 0.1, "--json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sources"][0]["doc_key"] == "bees" and data["sources"][0]["passage"] == 0
    assert len(data["new_token_ids"]) <= 4 and data["level"] == "lossless"
    assert data["baseline_first_token_seconds"] > 0 and data["speedup"] > 0
    text = run("ask", "lighthouse keeper", "--store", filled_store, "--model", tiny_model_dir, "-n", 2, "-q")
    assert text.exit_code == 0, text.output
    assert "lighthouse.txt passage 0" in text.stderr and "faster" in text.stderr


def test_store_commands(filled_store, tmp_path):
    info = run("store", "info", filled_store, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["documents"] == 2
    assert run("store", "verify", filled_store, "-q").exit_code == 0
    gc = run("store", "gc", filled_store, "--dry-run", "--json")
    assert gc.exit_code == 0 and json.loads(gc.stdout)["freed_bytes"] == 0


def test_store_verify_fails_on_damage(km, tmp_path):
    (tmp_path / "d.txt").write_text(TEXT)
    with PassageStore(tmp_path / "s", create=True) as store:
        precache([tmp_path / "d.txt"], store, km, passage_tokens=512, level="lossless")
        path = Path(store.artifacts.path(next(iter(store.index.artifact_names()))))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    result = run("store", "verify", tmp_path / "s", "-q")
    assert result.exit_code == 3
    assert "checksum mismatch" in result.stdout and "1 problem(s)" in result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        ("ask q? --store {tmp}/missing --model {model}", "no kvzip store at"),
        ("store info {tmp}/missing", "no kvzip store at"),
        ("precache {tmp}/empty.txt --store {tmp}/s --model {model}", "holds no text"),
        ("precache {tmp}/nothing --store {tmp}/s --model {model}", "document not found"),
        ("precache {tmp}/empty.txt --store {tmp}/s --level nope", "unknown level 'nope'"),
        ("precache {tmp}/doc.txt --store {tmp}/s --model {model} --passage-tokens 0", "must be positive"),
        ("precache {tmp}/doc.txt --store {tmp}/s --model {model} --engine spark", "--engine must be"),
    ],
)
def test_bad_inputs_are_one_line_errors(args, needle, tmp_path, tiny_model_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "doc.txt").write_text(TEXT)
    argv = args.format(tmp=tmp_path, model=tiny_model_dir).split()
    assert_one_line_error(run(*argv), needle)


def test_ask_refusals(filled_store, tiny_model_dir):
    base = ["--store", filled_store, "--model", tiny_model_dir, "-q"]
    assert_one_line_error(run("ask", "?!", *base), "no words")
    assert_one_line_error(run("ask", "zebra quantum", *base), "no stored passage")
    assert_one_line_error(run("ask", "bees", *base, "--blend-recompute", 2), "between 0 and 1")
    assert_one_line_error(run("ask", "bees", *base, "--level", "small"), "no caches at level 'small'")


def test_a_passage_without_rope_is_refused(km, tmp_path, monkeypatch):
    (tmp_path / "d.txt").write_text(TEXT)
    with PassageStore(tmp_path / "s", create=True) as store:
        with monkeypatch.context() as patch:
            patch.setattr(KVModel, "rope_tables", lambda self: (None, None))  # files get rope: null
            precache([tmp_path / "d.txt"], store, km, passage_tokens=512, level="lossless")
        level, hits = retrieve(store, "lamp", km, top_k=1)
        with pytest.raises(UnsupportedModelError, match="rope: null"):
            load_passage(store, hits[0], km, level)


# ----------------------------------------------------------------------- Ray
def test_precache_on_ray(km, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra kvzip[ray]")
    (tmp_path / "d.txt").write_text(TEXT * 2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}})
    try:
        url = (tmp_path / "artifacts").as_uri()  # an fsspec URL the workers reach
        with PassageStore(tmp_path / "s", create=True, artifacts=url) as store:
            summary = precache([tmp_path / "d.txt"], store, km, passage_tokens=64, level="lossless", engine="ray")
            assert summary.cached == summary.unique_passages > 1
            assert store.verify().ok
    finally:
        ray.shutdown()
    with PassageStore(tmp_path / "s") as store:
        again = precache([tmp_path / "d.txt"], store, km, passage_tokens=64, level="lossless", engine="ray")
    assert again.cached == 0  # nothing left to do: Ray is not even started


def test_ray_refuses_memory_artifacts(km, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra kvzip[ray]")
    (tmp_path / "d.txt").write_text(TEXT)
    with PassageStore(tmp_path / "s", create=True, artifacts=f"memory://{uuid.uuid4().hex}") as store:
        with pytest.raises(InputError, match="Ray workers cannot reach"):
            precache([tmp_path / "d.txt"], store, km, passage_tokens=64, level="lossless", engine="ray")
