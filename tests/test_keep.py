"""Dropping entries by importance (``--keep``): the selection, the pruned cache and its
attention, files that store kept entries, and every path that reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run
from tiny import tiny_model, windowed_model

from kvzip import api, errors
from kvzip import importance as scoring
from kvzip.formats import LayeredKV, PositionLayout
from kvzip.importance.keep import choose
from kvzip.levels.files import DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS, chunk_span
from kvzip.model.pruned import is_pruned

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "Sphinx of black quartz, judge my vow. ") * 3


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ------------------------------------------------------------------ selection
def _layout(widths, heads=2, t=None):
    t = t or max(widths)
    return PositionLayout([[np.arange(t - w, t, dtype=np.int64)] * heads for w in widths], t)


def test_sinks_and_the_last_position_are_always_kept():
    layout = _layout([40, 40])
    scores = [np.zeros((2, 40)) for _ in range(2)]
    for s in scores:
        s[:, 10:17] = 1.0  # the only entries that matter: 7, with the 5 always kept 12
    kept = choose(scores, layout, 0.3, "head")
    for k in kept:
        assert k[:, :4].all() and k[:, -1].all()
        assert k[:, 10:17].all()
        assert (k.sum(axis=1) == 12).all()  # ceil(0.3 * 40)
    assert not choose(scores, layout, 0.01, "shared")[0][:, 4:39].any()


def test_the_shared_budget_gives_heads_that_spread_their_attention_more():
    layout = _layout([100], heads=2)
    s = np.zeros((2, 100))
    s[0] = 1.0  # head 0: attention spread over every entry
    s[1, 50:55] = 20.0  # head 1: a handful of entries
    s[1] += 0.01
    shared = choose([s], layout, 0.5, "shared")[0]
    per_head = choose([s], layout, 0.5, "head")[0]
    assert shared.sum() == per_head.sum() == 100
    assert shared[0].sum() > 80 and shared[1, 50:55].all()
    assert per_head[0].sum() == per_head[1].sum() == 50


def test_the_shared_budget_does_not_favour_small_layers():
    """A sliding layer holds fewer entries than a full one, so each of its entries carries a
    larger share of its head's attention; the shared budget compares entries against their
    own head's mean, so two layers with the same pattern keep the same fraction."""
    layout = PositionLayout([[np.arange(400 - 100, 400)], [np.arange(400)]], 400)
    rng = np.random.default_rng(0)
    pattern = lambda n: np.exp(3 * rng.permutation(np.linspace(0, 1, n)))[None]  # noqa: E731 - one distribution
    kept = choose([pattern(100), pattern(400)], layout, 0.5, "shared")
    small, big = kept[0][0, :100].mean(), kept[1][0].mean()
    assert abs(small - big) < 0.05


def test_heads_kept_together_share_their_positions():
    layout = _layout([60, 60], heads=3)
    rng = np.random.default_rng(0)
    scores = [rng.random((3, 60)) for _ in range(2)]
    for rule in ("shared", "head"):
        kept = choose(scores, layout, 0.4, rule, heads_together=True)
        for k in kept:
            assert (k == k[0]).all()
        assert sum(int(k[0].sum()) for k in kept) == pytest.approx(0.4 * 120, abs=2)


def test_a_fraction_outside_zero_to_one_is_refused():
    layout = _layout([10])
    for bad in (0, -0.5, 1.5):
        with pytest.raises(errors.InputError, match="--keep"):
            choose([np.ones((2, 10))], layout, bad)
    with pytest.raises(errors.InputError, match="--keep-rule"):
        choose([np.ones((2, 10))], layout, 0.5, "bogus")


def test_subset_keeps_each_heads_entries_first_and_pads_the_rest():
    layout = _layout([6], heads=2)
    layer = torch.arange(2 * 2 * 6 * 3, dtype=torch.float32).reshape(2, 2, 6, 3)
    kv = LayeredKV([layer], layout)
    mask = np.array([[1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 0, 1]], bool)
    out = kv.subset([mask])
    assert [p.tolist() for p in out.layout.positions[0]] == [[0, 2, 5], [0, 1, 2, 3, 5]]
    assert out.layers[0].shape == (2, 2, 5, 3)
    torch.testing.assert_close(out.layers[0][:, 0, :3], layer[:, 0, [0, 2, 5]])
    assert (out.layers[0][:, 0, 3:] == 0).all()
    assert out.layout.layer_positions(0)[0].tolist() == [0, 2, 5, -1, -1]
    again = LayeredKV([layer.numpy()], layout).subset([mask])  # numpy the same
    np.testing.assert_array_equal(again.layers[0], out.layers[0].numpy())


# ------------------------------------------------- the pruned cache's attention
MODELS = [("llama", None), ("gemma3", 16), ("mistral", 16), ("qwen2", 16), ("gpt_oss", 16)]


def _model(family, window):
    return tiny_model(family) if window is None else windowed_model(family, window)


@pytest.mark.parametrize("family,window", MODELS)
def test_a_pruned_cache_holding_everything_attends_exactly_as_the_model(family, window):
    """The attention function itself: every entry kept but held as a pruned cache (each
    head its own tensors, masked by true position; sliding windows slide past the cached
    entries as 40 new tokens are read after a window of 16)."""
    km = _model(family, window)
    ids = km.document_ids(TEXT, None)
    prompt, follow = ids[:100], ids[100:140]
    kv = km.prefill(prompt)
    ref = km.teacher_force(kv, follow)
    cache = km._pruned_cache(kv.layout, len(follow), km.device)
    assert is_pruned(cache)
    for i, layer in enumerate(kv.layers):
        km.fill_cache(cache, i, slice(None), slice(0, layer.shape[2]), layer)
    from kvzip.model.pruned import pruned_attention

    with torch.inference_mode(), pruned_attention(km.model, cache):
        out = km.model(input_ids=km._ids(follow), cache=cache, use_cache=True).logits[0].float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert km.model.config._attn_implementation != "kvzip-pruned"  # switched back


def test_pruned_attention_matches_masking_the_dropped_entries():
    """One layer, one kv head: dropping entries must equal hiding them from every query
    of the full cache (true positions, RoPE as stored)."""
    import transformers as tf
    from tiny import byte_tokenizer

    from kvzip.model import KVModel

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                            eos_token_id=256, pad_token_id=256, bos_token_id=None)
    km = KVModel(tf.AutoModelForCausalLM.from_config(config).eval(), byte_tokenizer())
    ids = km.document_ids(TEXT, None)
    prompt, follow = ids[:80], ids[80:100]
    kv = km.prefill(prompt)
    keep = np.zeros((1, 80), bool)
    keep[0, ::3] = True
    keep[0, -1] = True
    pruned = km.teacher_force(kv.subset([keep]), follow)
    full = km.build_cache(kv, room=len(follow))
    allowed = torch.ones((len(follow), 80 + len(follow)), dtype=torch.bool).tril(80)
    allowed[:, :80] &= torch.from_numpy(keep[0])[None, :]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
    with torch.inference_mode():
        ref = km.model(input_ids=km._ids(follow), cache=full, attention_mask=mask, use_cache=True,
                       position_ids=torch.arange(80, 100)[None]).logits[0].float()
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-5)


def test_the_pruned_cache_is_really_smaller():
    km = tiny_model("llama")
    ids = km.document_ids(TEXT, None)[:120]
    scored = scoring.score(km, ids, "prefill")
    kept = scored.kv.subset(choose(scored.scores, scored.kv.layout, 0.3, "shared"))
    cache = km.empty_cache(kept.layout, room=8)
    held = sum(k.shape[0] for layer in cache.layers for k in layer.k)
    assert held == kept.layout.stored() + 8 * km.kv_heads * km.num_layers
    assert held < 0.4 * km.num_layers * km.kv_heads * 120


# ------------------------------------------------------------------ files
def _encode(km, tmp_path, keep, rule="shared", level="lossless", importance=None, name="x.kvz"):
    out = tmp_path / name
    api.encode(TEXT, out, model=km, levels=[level], chunk_tokens=64, dtype="float32", keep=keep,
               keep_rule=rule, importance=importance, if_no_profile="uncalibrated")
    return out


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("gpt_oss", 16)])
def test_a_kept_file_attaches_its_entries_at_their_true_positions(family, window, tmp_path):
    km = _model(family, window)
    ids = km.document_ids(TEXT, None)
    out = _encode(km, tmp_path, 0.5, "head")
    loaded = api.load_kv(out)
    assert km.is_pruned_layout(loaded.kv.layout)
    # the stored entries are the prefill's at the positions kept
    kv = km.prefill(ids)
    for i, layer in enumerate(loaded.kv.layers):
        for h, p in enumerate(loaded.kv.layout.positions[i]):
            slot = np.searchsorted(kv.layout.positions[i][h], p)
            torch.testing.assert_close(layer[:, h, : p.size], kv.layers[i][:, h, slot])
    prompt = " and then"
    attached = api.generate(out, prompt, model=km, max_new_tokens=6)
    # the same as generating from the kept entries in memory (no file)
    follow = km.prompt_ids(prompt, None)
    assert attached.new_token_ids == km.generate(ids + follow, kv=loaded.kv, max_new_tokens=6)
    # and close to the whole cache: dropping half of a random model's entries moves its logits
    ref = km.teacher_force(kv, follow)
    assert 0 < kl(ref, km.teacher_force(loaded.kv, follow)) < 0.5


def test_keep_one_is_token_identical_to_no_pruning(tmp_path):
    km = tiny_model("llama")
    whole = _encode(km, tmp_path, None, name="whole.kvz")
    kept = _encode(km, tmp_path, 1.0, name="kept.kvz")
    a = api.generate(whole, " and then", model=km, max_new_tokens=8)
    b = api.generate(kept, " and then", model=km, max_new_tokens=8)
    assert a.new_token_ids == b.new_token_ids
    assert api.info(kept)["keep"]["entries_kept"] == api.info(kept)["keep"]["entries_scored"]
    # with no prompt (the last cached token read again) as well
    assert api.generate(kept, "", model=km, max_new_tokens=4).new_token_ids == \
        api.generate(whole, "", model=km, max_new_tokens=4).new_token_ids


def _layers(path):
    return [t.clone() for t in api.load_kv(path).kv.layers]


def test_keep_weighs_what_it_keeps_by_the_same_scores(tmp_path):
    """--keep F alone spends the lossy level's bits by the scores it dropped by, exactly as
    --keep F --importance SCORER does, and says so (not the profile's default scorer);
    --importance none drops only."""
    km = tiny_model("llama")
    kw = dict(model=km, levels=["balanced"], chunk_tokens=64, dtype="float32", if_no_profile="uncalibrated", keep=0.5)
    alone, asked, plain = (tmp_path / f"{n}.kvz" for n in ("alone", "asked", "plain"))
    s_alone = api.encode(TEXT, alone, keep_by="keynorm", **kw)
    s_asked = api.encode(TEXT, asked, importance="keynorm", **kw)
    s_plain = api.encode(TEXT, plain, keep_by="keynorm", importance="none", **kw)
    for a, b in zip(_layers(alone), _layers(asked)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s_alone.importance == s_asked.importance == api.info(alone)["importance"]["scorer"] == "keynorm"
    assert s_plain.importance is None and api.info(plain)["importance"] is None
    assert api.info(plain)["keep"] == api.info(alone)["keep"]  # the same entries kept
    assert any(not torch.equal(a, b) for a, b in zip(_layers(alone), _layers(plain)))


def test_keep_one_at_a_lossy_level_answers_as_the_weighed_file_without_keep(tmp_path):
    """What --keep adds besides dropping (the pruned layout's attention) changes no token:
    --keep 1.0 writes the entries --importance SCORER writes, and generates the same."""
    km = tiny_model("llama")
    kw = dict(model=km, levels=["balanced"], chunk_tokens=64, dtype="float32", if_no_profile="uncalibrated")
    whole, kept = tmp_path / "whole.kvz", tmp_path / "kept.kvz"
    api.encode(TEXT, whole, importance="keynorm", **kw)
    api.encode(TEXT, kept, keep=1.0, keep_by="keynorm", **kw)
    for a, b in zip(_layers(whole), _layers(kept)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert api.generate(kept, " and then", model=km, max_new_tokens=8).new_token_ids == \
        api.generate(whole, " and then", model=km, max_new_tokens=8).new_token_ids


def test_a_lossless_file_records_no_importance(tmp_path):
    """lossless codes every entry alike: asked to weigh, it takes no classes and says none."""
    km = tiny_model("llama")
    out = tmp_path / "l.kvz"
    summary = api.encode(TEXT, out, model=km, levels=["lossless"], chunk_tokens=64, importance="prefill")
    assert summary.importance is None and api.info(out)["importance"] is None
    assert api.info(out)["levels"][0]["importance_classes"] is None


def test_a_kept_file_with_no_prompt_rereads_its_last_token(tmp_path):
    km = tiny_model("llama")
    out = _encode(km, tmp_path, 0.4)
    ids = km.document_ids(TEXT, None)
    loaded = api.load_kv(out)
    res = api.generate(out, "", model=km, max_new_tokens=4)
    assert res.new_token_ids == km.generate(ids, kv=loaded.kv, max_new_tokens=4)


@pytest.mark.parametrize("level", ["balanced", "high"])
def test_every_lossy_level_stores_kept_entries_with_importance(level, tmp_path):
    km = windowed_model("gemma3", 16)
    out = _encode(km, tmp_path, 0.5, level=level, importance="prefill")
    info = api.info(out)
    assert info["keep"]["fraction"] == 0.5 and info["keep"]["scorer"] == "prefill"
    assert info["importance"]["scorer"] == "prefill"
    assert info["keep"]["entries_kept"] == pytest.approx(0.5 * info["keep"]["entries_scored"], abs=1)
    assert info["stored_elements"] == 2 * info["keep"]["entries_kept"] * km.head_dim
    classes = info["levels"][0]["importance_classes"]  # the kept entries, by class, block by block
    assert sum(c["elements"] for c in classes) == info["stored_elements"]
    assert classes[0]["bits_per_element"] > classes[2]["bits_per_element"]
    assert api.verify(out).ok
    assert len(api.generate(out, " and", model=km, max_new_tokens=3).new_token_ids) == 3


def test_a_layer_basis_keeps_a_layers_heads_together(tmp_path):
    """A calibrated level maps a layer's heads jointly: its kept positions are per layer."""
    km = tiny_model("llama")
    out = tmp_path / "cal.kvz"
    api.encode(TEXT, out, model=km, levels=["balanced"], chunk_tokens=64, keep=0.5)
    info = api.info(out)
    assert info["keep"]["heads"] == "layer"
    layout = api.load_kv(out).kv.layout
    assert all(layout.heads_share(i) for i in range(layout.num_layers))
    assert km.is_pruned_layout(layout)


def test_decode_writes_kept_entries_with_their_positions(tmp_path):
    km = tiny_model("llama")
    out = _encode(km, tmp_path, 0.5, "head")
    dec = tmp_path / "x.safetensors"
    api.decode(out, dec)
    tensors = load_file(dec)
    layout = api.load_kv(out).kv.layout
    for i in range(km.num_layers):
        pos = tensors[f"layers.{i}.positions"]
        assert pos.tolist() == layout.layer_positions(i).tolist()  # -1 where a head has fewer
        assert tensors[f"layers.{i}.key"].shape == (*pos.shape, km.head_dim)


def test_a_sliding_layer_holding_an_entry_older_than_its_window_is_refused():
    km = windowed_model("gemma3", 16)
    t = 80
    heads = [np.array([0, 70, 79])] * km.kv_heads  # position 0: outside a window of 16
    layout = PositionLayout([heads] * km.num_layers, t)
    with pytest.raises(errors.ModelMismatchError, match="keeps only the last 15"):
        km.check_layout(layout)


def test_cli_keep(tmp_path):
    from tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "m", "llama")
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "k.kvz"
    res = run("encode", doc, "-o", out, "--model", model, "--level", "lossless", "--keep", "0.5",
              "--keep-rule", "head", "-q")
    assert res.exit_code == 0, res.output
    info = json.loads(run("info", out, "--json").stdout)
    assert info["keep"]["rule"] == "head" and info["keep"]["fraction"] == 0.5
    assert info["keep"]["scorer"] == "reconstruct" and info["importance"] is None  # the default; no weighting
    by = tmp_path / "by.kvz"
    assert run("encode", doc, "-o", by, "--model", model, "--level", "lossless", "--keep", "0.5",
               "--keep-by", "prefill", "-q").exit_code == 0
    assert json.loads(run("info", by, "--json").stdout)["keep"]["scorer"] == "prefill"
    shown = run("info", out).stdout
    assert "kept" in shown and "50.0%" in shown
    for bad, needle in ((["--keep", "0"], "--keep"), (["--keep", "2"], "--keep"),
                        (["--keep", "0.5", "--keep-rule", "x"], "--keep-rule"),
                        (["--keep", "0.5", "--keep-by", "nope"], "unknown importance scorer"),
                        (["--keep", "0.5", "--keep-by", "prefill", "--importance", "keynorm"], "same scorer")):
        bad_out = tmp_path / "bad.kvz"
        assert_one_line_error(run("encode", doc, "-o", bad_out, "--model", model, *bad), needle)
        assert not bad_out.exists()


# ------------------------------------------------------------------ streaming
def test_streaming_a_kept_file_serves_true_chunk_sizes_and_attaches_it(tmp_path):
    import httpx

    from kvzip.stream.client import _chunk_elements, stream_generate
    from kvzip.stream.manifest import parse_manifest
    from kvzip.stream.server import create_app, serve_in_thread

    km = tiny_model("llama")
    root = tmp_path / "ctx"
    root.mkdir()
    out = _encode(km, root, 0.4, "head", name="k.kvz")
    loaded = api.load_kv(out)
    layout = loaded.kv.layout
    assert not all(layout.heads_share(i) for i in range(layout.num_layers))  # ragged heads
    ids = km.document_ids(TEXT, None)
    prompt = " and then"
    local = km.generate(ids + km.prompt_ids(prompt, None), kv=loaded.kv, max_new_tokens=6)
    with serve_in_thread(create_app(root)) as url:
        manifest_url = url + "/contexts/k.kvz/manifest"
        manifest = parse_manifest(httpx.get(manifest_url).json(), manifest_url)
        per = 2 * km.head_dim
        assert [_chunk_elements(manifest, c) for c in manifest.chunks] == [
            per * layout.chunk_stored(c.token_start, c.token_start + c.token_count) for c in manifest.chunks]
        assert sum(_chunk_elements(manifest, c) for c in manifest.chunks) == per * layout.stored()
        streamed = stream_generate(manifest_url, prompt, km, levels=["lossless"], max_new_tokens=6)
        assert streamed.new_token_ids == local
        # its chunks cannot be recomputed from text: said in one line, not guessed
        with pytest.raises(errors.InputError, match="cannot be recomputed"):
            stream_generate(manifest_url, prompt, km, levels=[], max_new_tokens=2)


@pytest.mark.parametrize("entropy", ["rans", "param", "param2", "hist"])
def test_a_block_holding_only_attention_sinks_codes_and_decodes(entropy):
    """A heavily pruned layer may hold nothing but its sinks in a chunk: the quantiser's
    body then has no token (it used to fail to reshape an empty array)."""
    from kvzip.codecs import ChunkContext, codec_from_config

    codec = codec_from_config({"id": "kvzip-lossy", "key_step": 0.27, "value_step": 0.5, "sink_tokens": 4,
                               "value_token_exp": 0.5, "entropy": entropy})
    for pos in (np.array([0, 1, 2, 3]), np.array([1, 3])):
        ctx = ChunkContext(0, pos.size, 1, 2, 8, "float32", None, positions=pos)
        x = np.random.default_rng(0).standard_normal((2, 1, 2, pos.size, 8)).astype(np.float32)
        y = codec.decode(codec.encode(x, ctx), ctx)
        assert np.abs(x - y).max() < 0.05  # sinks: a 16 times finer step


def test_kvzip_load_of_a_kept_file_runs_only_under_kvzip_attention(tmp_path):
    """The library face: the loaded cache is a pruned one, on the device asked for; the
    model's own attention would read only the new tokens, so it is refused, and inside
    kvzip.pruned_attention generation is the same as kvzip's own."""
    import kvzip

    km = tiny_model("llama")
    out = _encode(km, tmp_path, 0.5, "head")
    ids = km.document_ids(TEXT, None) + km.prompt_ids(" and then", None)
    input_ids = torch.tensor([ids])
    cache = kvzip.load(out, model=km.model, device="cpu")
    assert is_pruned(cache) and all(layer.device.type == "cpu" for layer in cache.layers)
    with pytest.raises(RuntimeError, match="pruned_attention"):
        km.model(input_ids=input_ids[:, -3:], cache=cache, use_cache=True)
    cache = kvzip.load(out, model=km.model)
    with kvzip.pruned_attention(km.model, cache):
        got = km.model.generate(input_ids=input_ids, cache=cache, max_new_tokens=5, do_sample=False,
                                pad_token_id=256)
    assert got[0, len(ids):].tolist() == km.generate(ids, kv=api.load_kv(out).kv, max_new_tokens=5)


# ----------------------------------------------------------------- RAG: kept passages
def _freqs(km):
    tables, index = km.rope_tables()
    return [km.rope_inv_freq()] * km.num_layers if tables is None else [tables[i] for i in index]


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("gpt_oss", 16)])
def test_insert_at_reads_tokens_inside_a_pruned_context_as_extend_at_does(family, window):
    """Tokens read at positions inside the context of a cache whose heads hold different
    entries: each sees what precedes it, as extend_at computes it with those slots hidden."""
    km = _model(family, window)
    ids = km.document_ids(TEXT, None)[:120]
    kv = km.prefill(ids)
    slots = [30, 31, 32, 33, 70, 71, 118]
    hidden = torch.ones(kv.token_count, dtype=torch.bool)
    hidden[slots] = False
    ref = km.extend_at(kv, [ids[p] for p in slots], slots, visible=hidden)
    masks = [np.stack([~np.isin(heads[0], slots)] * kv.kv_heads) for heads in kv.layout.positions]
    got = km.insert_at(kv.subset(masks), [ids[p] for p in slots], slots)
    for i in range(km.num_layers):
        for h in range(km.kv_heads):
            held = got.layout.positions[i][h]
            assert np.all(np.diff(held) > 0)  # in position order again
            for j, p in enumerate(slots):
                at = int(np.flatnonzero(held == p)[0])
                torch.testing.assert_close(got.layers[i][:, h, at], ref[:, i, h, j], atol=1e-5, rtol=1e-5)
    with pytest.raises(errors.InputError, match="already holds"):
        km.insert_at(kv, [ids[118]], [118])


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("gpt_oss", 16)])
@pytest.mark.parametrize("blend,recompute_window", [(0.0, False), (0.3, False), (0.3, True)])
def test_assembling_passages_as_pruned_caches_matches_the_dense_assembly(family, window, blend, recompute_window):
    """The assembly kept passages take (each head its own entries), given every entry,
    builds the cache the dense assembly builds: moved keys, boundary recompute and the
    sliding layers' recomputed window alike."""
    from kvzip.store.assemble import CachedPassage, _assemble_pruned, assemble

    km = _model(family, window)
    ids = km.document_ids(TEXT, None)
    size = 12 if window else 30
    parts = [ids[i * size : (i + 1) * size] for i in range(3)]
    cached = [CachedPassage(p, km.prefill(p).dense_array(), _freqs(km)) for p in parts]
    prefix = ids[200:205]
    context, dense = assemble(km, prefix, cached, blend_fraction=blend, recompute_window=recompute_window)
    same, layered = _assemble_pruned(km, list(prefix), cached, blend, km.prefill(prefix).dense_array(),
                                     recompute_window)
    assert same == context
    for i, heads in enumerate(layered.layout.positions):
        for h, held in enumerate(heads):
            torch.testing.assert_close(layered.layers[i][:, h, : held.size], dense[:, i, h, held],
                                       atol=1e-5, rtol=1e-5)
    follow = ids[300:310]
    torch.testing.assert_close(km.teacher_force(layered, follow), km.teacher_force(dense, follow),
                               atol=1e-5, rtol=1e-5)


def test_a_chunk_whose_heads_share_positions_after_chunks_where_they_differ_keeps_each_heads_entries(tmp_path):
    """A layer's heads keep different entries in its first chunk and every entry in its
    second: the second chunk is one block of all heads, and each head's entries there sit
    at its own slots (they used to be gathered at the first head's, a lossless file then
    holding other entries than those kept)."""
    from kvzip.levels import write_kvz

    km = tiny_model("llama")
    ids = km.document_ids(TEXT, None)[:128]
    kv = km.prefill(ids)
    masks = []
    for layer in kv.layers:
        m = np.ones((km.kv_heads, layer.shape[2]), bool)
        m[0, 10:40:2] = False  # head 0 drops 15 entries of the first chunk, the others 5
        m[1:, 20:25] = False
        masks.append(m)
    kept = kv.subset(masks)
    out = tmp_path / "k.kvz"
    write_kvz(kept, ids, out, km, levels=["lossless"], chunk_tokens=64, dtype="float32")
    got = api.load_kv(out).kv
    for i, layer in enumerate(kept.layers):
        assert got.layout.layer_positions(i).tolist() == kept.layout.layer_positions(i).tolist()
        assert torch.equal(got.layers[i], layer)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_per_head_selection_round_trips_losslessly(tmp_path, seed):
    """Random entries kept per head, some chunks with every entry (so the heads share
    positions there) and some with none of a head's: a lossless file gives back exactly the
    kept entries from ``load_kv`` and from attaching (each pruned head's keys, values and
    positions).  (The device path has no lossless form; test_devices covers it.)"""
    from kvzip.levels import attach_kv, write_kvz

    km = tiny_model("llama")
    ids = km.document_ids(TEXT, None)[:160]
    kv = km.prefill(ids)
    rng = np.random.default_rng(seed)
    masks = []
    for layer in kv.layers:
        m = np.ones((km.kv_heads, layer.shape[2]), bool)
        for h in range(km.kv_heads):
            for c in range(0, layer.shape[2], 32):
                m[h, c : c + 32] = rng.random(32) < rng.choice([0.0, 0.3, 0.8, 1.0])
        m[:, :4] = m[:, -1] = True  # the sinks and the last position, as --keep keeps them
        masks.append(m)
    kept = kv.subset(masks)
    out = tmp_path / "k.kvz"
    write_kvz(kept, ids, out, km, levels=["lossless"], chunk_tokens=32, dtype="float32")

    def check(cache):
        for i, layer in enumerate(cache.layers):
            for h in range(km.kv_heads):
                pos = kept.layout.positions[i][h]
                n = layer.count[h]
                assert n == pos.size and layer.pos[h][:n].tolist() == pos.tolist()
                assert torch.equal(layer.k[h][:n], kept.layers[i][0, h, :n])
                assert torch.equal(layer.v[h][:n], kept.layers[i][1, h, :n])

    got = api.load_kv(out).kv
    for i, layer in enumerate(kept.layers):
        assert got.layout.layer_positions(i).tolist() == kept.layout.layer_positions(i).tolist()
        assert torch.equal(got.layers[i], layer)
    check(attach_kv(out, km).cache)


# ------------------------------------------------------------------ chunk span
def test_a_pruned_file_spans_wider_chunks_unless_told():
    assert chunk_span() == chunk_span(keep=1.0) == chunk_span(keep=0.9) == DEFAULT_CHUNK_TOKENS == 256
    assert chunk_span(keep=0.5) == 512
    assert chunk_span(keep=0.3) == 832  # about 256 / 0.3, a multiple of 64
    assert chunk_span(keep=0.001) == MAX_CHUNK_TOKENS
    assert chunk_span(100, keep=0.5) == chunk_span(100) == 100


def test_wider_chunks_make_a_pruned_file_smaller_and_keep_the_same_entries(tmp_path):
    """Each chunk pays its rows' side information once: at --keep 0.5 a default chunk spans
    twice the positions, so it holds as many entries as a dense chunk, for the same entries."""
    km = tiny_model("llama")
    text = (TEXT * 4)[:500]  # 500 tokens (bytes): one chunk of 512 positions, or two of 256
    wide, narrow = tmp_path / "wide.kvz", tmp_path / "narrow.kvz"
    options = dict(model=km, levels=["balanced"], if_no_profile="uncalibrated", keep=0.5, keep_by="keynorm")
    api.encode(text, wide, **options)
    api.encode(text, narrow, chunk_tokens=256, **options)
    assert api.info(wide)["chunk_tokens"] == 512 and api.info(narrow)["chunk_tokens"] == 256
    assert api.info(wide)["chunks"] < api.info(narrow)["chunks"]
    assert wide.stat().st_size < narrow.stat().st_size
    assert api.load_kv(wide).kv.layout.to_bytes() == api.load_kv(narrow).kv.layout.to_bytes()
    dense = tmp_path / "dense.kvz"
    api.encode(text, dense, model=km, levels=["balanced"], if_no_profile="uncalibrated")
    assert api.info(dense)["chunk_tokens"] == DEFAULT_CHUNK_TOKENS
