"""The library face for transformers users: kvzip.save / kvzip.load / kvzip.open.

Every cache here comes from a plain forward pass of a plain transformers model (the
tiny random models of each family), never through kvzip's own capture.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT
from tiny import FAMILIES, byte_tokenizer, save_tiny_model, tiny_model

import kvzip
from kvzip import api
from kvzip.errors import InputError, ModelMismatchError, UnknownLevelError
from kvzip.formats import FileSource
from kvzip.formats.spec import FIRST_READ_BYTES
from kvzip.levels import open_cache
from kvzip.model import KVModel

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module", params=FAMILIES)
def plain(request):
    """(family, model, tokenizer): plain transformers objects, no kvzip wrapper."""
    km = tiny_model(request.param)
    return request.param, km.model, km.tokenizer


def prefill(model, ids: torch.Tensor):
    with torch.inference_mode():
        return model(ids, use_cache=True).cache


def doc_ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids  # [1, T], within every window


def greedy(model, ids: torch.Tensor, cache=None, n: int = 12) -> list[int]:
    kwargs = {} if cache is None else {"cache": cache}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=256, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


# -------------------------------------------------------------- each family
def test_lossless_round_trip_is_bit_exact_and_continues_like_the_text(plain, tmp_path):
    family, model, tok = plain
    ids = doc_ids(tok)
    cache = prefill(model, ids)
    original = [(k.clone(), v.clone()) for k, v in layers_kv(cache)]
    out = tmp_path / f"{family}.kvz"
    summary = kvzip.save(cache, out, model=model, input_ids=ids, chunk_tokens=64)
    assert summary.levels == ["lossless"] and summary.tokens == ids.shape[1]

    loaded = kvzip.load(out, model=model)
    assert type(loaded) is type(cache)
    assert loaded.get_seq_length() == ids.shape[1]
    for (k0, v0), (k1, v1) in zip(original, layers_kv(loaded)):
        assert k1.dtype == k0.dtype and k1.device == k0.device
        assert torch.equal(k0, k1) and torch.equal(v0, v1)

    prompt = tok(" What jumps over the dog?", return_tensors="pt", add_special_tokens=False).input_ids
    full = torch.cat([ids, prompt], dim=1)
    assert greedy(model, full, cache=loaded) == greedy(model, full)


def test_lossy_level_round_trip_is_close(plain, tmp_path):
    family, model, tok = plain
    ids = doc_ids(tok)
    cache = prefill(model, ids)
    lossless = kvzip.save(cache, tmp_path / "exact.kvz", model=model, input_ids=ids)
    # No profile exists for a tokenizer-less tiny model: the default uses the uncalibrated
    # codec at once instead of calibrating.
    summary = kvzip.save(cache, tmp_path / "lossy.kvz", model=model, input_ids=ids, level="balanced")
    assert summary.levels == ["balanced"] and summary.profile is None
    assert summary.file_bytes < lossless.file_bytes / 3
    loaded = kvzip.load(tmp_path / "lossy.kvz", model=model)
    for (k0, v0), (k1, v1) in zip(layers_kv(cache), layers_kv(loaded)):
        for a, b in ((k0, k1), (v0, v1)):
            assert a.shape == b.shape and a.dtype == b.dtype
            rel = float((a - b).norm() / a.norm())
            assert rel < 0.15, f"{family}: relative error {rel:.3f}"


def test_a_file_of_another_model_is_refused(plain, tmp_path):
    family, model, tok = plain
    ids = doc_ids(tok)
    out = tmp_path / "doc.kvz"
    kvzip.save(prefill(model, ids), out, model=model, input_ids=ids)
    other = tiny_model(family, seed=1).model  # same architecture, other weights
    with pytest.raises(ModelMismatchError, match="weights"):
        kvzip.load(out, model=other)
    with pytest.raises(ModelMismatchError):
        kvzip.load(out, model=other, tokenizer=tok)


class CountingSource:
    """A byte source that records every read."""

    def __init__(self, path: Path):
        self.inner = FileSource(path)
        self.reads: list[tuple[int, int]] = []

    def size(self) -> int:
        return self.inner.size()

    def get_bytes(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.inner.get_bytes(offset, length)

    def close(self) -> None:
        self.inner.close()


def test_open_reads_the_header_then_only_the_chunk_asked_for(plain, tmp_path):
    family, model, tok = plain
    ids = doc_ids(tok)
    out = tmp_path / "doc.kvz"
    kvzip.save(prefill(model, ids), out, model=model, input_ids=ids, tokenizer=tok,
               level=["lossless", "balanced"], chunk_tokens=40)
    with open_cache(out) as file:
        data_offset = file.reader.preamble.data_offset
        entry = file.kv_entries("balanced")[2]
        want = file.decode_chunk(entry)

    source = CountingSource(out)
    with kvzip.open(source) as kvz:
        # Opening: the reader's fixed first read (header and index), and a second one
        # only if they are longer; nothing else.
        assert source.reads[0][0] == 0 and len(source.reads) <= 2
        assert sum(length for _, length in source.reads) <= max(FIRST_READ_BYTES, data_offset)
        assert source.size() > 2 * FIRST_READ_BYTES  # so a read of everything would show
        assert kvz.tokens == ids.shape[1] and kvz.levels == ("lossless", "balanced")
        assert kvz.default_level == "lossless"
        assert [(c.start, c.stop) for c in kvz.chunks] == [
            (s, min(s + 40, kvz.tokens)) for s in range(0, kvz.tokens, 40)
        ]
        before = len(source.reads)
        chunk = kvz.decode_chunk(2, level="balanced")
        assert source.reads[before:] == [(entry.offset, entry.length)]
        assert chunk.shape == (2, kvz.num_layers, kvz.kv_heads, entry.token_count, kvz.head_dim)
        assert torch.equal(chunk, torch.from_numpy(want))

        exact = kvz.decode_chunk(1)  # the default level: lossless
        cache = prefill(model, ids)
        c = kvz.chunks[1]
        for i, (k, v) in enumerate(layers_kv(cache)):
            assert torch.equal(exact[0, i], k[0, :, c.start:c.stop])
            assert torch.equal(exact[1, i], v[0, :, c.start:c.stop])
        assert kvz.token_ids == ids[0].tolist()
        assert torch.equal(kvz.input_ids, ids)
        texts = kvz.chunk_texts()
        assert texts is not None and "".join(texts) == tok.decode(ids[0])


# ------------------------------------------------------------ the CLI's identity
def test_fingerprint_matches_the_cli_and_files_cross_over(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_tiny_model(tmp_path / "model", "qwen2")
    cli = KVModel.load(str(directory))  # what `kvzip encode --model DIR` loads
    model = AutoModelForCausalLM.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    ids = doc_ids(tok)

    mine = tmp_path / "mine.kvz"
    kvzip.save(prefill(model, ids), mine, model=model, input_ids=ids, tokenizer=tok)
    with kvzip.open(mine) as kvz:
        assert kvz.model_fingerprint == cli.identity()["fingerprint"]
        assert kvz.chunk_texts() is not None
    # The CLI's own reader takes it (and, as the README says, not one saved without the
    # tokenizer: the CLI compares whole fingerprints) ...
    assert api.generate(mine, " and", model=cli, max_new_tokens=4).cached_tokens == ids.shape[1]
    kvzip.save(prefill(model, ids), tmp_path / "bare.kvz", model=model, input_ids=ids)
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        api.generate(tmp_path / "bare.kvz", " and", model=cli, max_new_tokens=4)
    # ... and a file the CLI wrote loads into the plain model, with or without tokenizer.
    theirs = tmp_path / "theirs.kvz"
    api.encode(TEXT, theirs, model=cli, levels=["lossless"])
    for kwargs in ({"tokenizer": tok}, {}):
        cache = kvzip.load(theirs, model=model, **kwargs)
        for (k0, v0), (k1, v1) in zip(layers_kv(prefill(model, ids)), layers_kv(cache)):
            torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)


def test_tokenizers_are_compared_when_both_sides_have_one(tiny_llama, tmp_path):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = doc_ids(tok)
    out = tmp_path / "doc.kvz"
    kvzip.save(prefill(model, ids), out, model=model, input_ids=ids, tokenizer=tok)
    other_tok = byte_tokenizer()
    other_tok.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        kvzip.load(out, model=model, tokenizer=other_tok)
    kvzip.load(out, model=model, tokenizer=byte_tokenizer())  # an equal tokenizer
    kvzip.load(out, model=model)  # none given: config and weights decide


def test_weights_changed_in_place_change_the_fingerprint(tmp_path):
    model = tiny_model("llama", seed=3).model
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before = tmp_path / "before.kvz"
    kvzip.save(prefill(model, ids), before, model=model, input_ids=ids)
    kvzip.load(before, model=model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # an in-place write, as an optimizer step makes
    with pytest.raises(ModelMismatchError, match="weights"):
        kvzip.load(before, model=model)
    with torch.no_grad():
        model.lm_head.weight.div_(1.5)
    model.half().float()  # new storage, rounded values
    with pytest.raises(ModelMismatchError, match="weights"):
        kvzip.load(before, model=model)
    after = tmp_path / "after.kvz"
    kvzip.save(prefill(model, ids), after, model=model, input_ids=ids)
    kvzip.load(after, model=model)


def test_the_weights_are_hashed_once_per_model_and_tokenizer(tmp_path, monkeypatch):
    model = tiny_model("qwen3", seed=4).model
    ids = torch.tensor([[7, 8, 9]])
    cache = prefill(model, ids)
    hashed = []
    real = type(model).state_dict

    def spy(self, *args, **kwargs):
        if not kwargs.get("keep_vars"):  # KVModel.identity's full read (the stamp keeps vars)
            hashed.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "state_dict", spy)
    tok = byte_tokenizer()
    for _ in range(3):
        kvzip.save(cache, tmp_path / "a.kvz", model=model, input_ids=ids)
        kvzip.load(tmp_path / "a.kvz", model=model)
        kvzip.save(cache, tmp_path / "b.kvz", model=model, input_ids=ids, tokenizer=tok)
    assert len(hashed) == 2  # once without a tokenizer, once with it
    tok.chat_template = "{{ messages }}"  # a tokenizer edited in place is fingerprinted again
    kvzip.save(cache, tmp_path / "b.kvz", model=model, input_ids=ids, tokenizer=tok)
    assert len(hashed) == 3


# ---------------------------------------------------------------- arguments
def test_input_ids_forms(tiny_llama, tmp_path):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = doc_ids(tok)
    cache = prefill(model, ids)
    for i, form in enumerate((ids, ids[0], ids[0].tolist(), ids.tolist(), ids.numpy(), ids[0].numpy())):
        out = tmp_path / f"{i}.kvz"
        kvzip.save(cache, out, model=model, input_ids=form)
        with kvzip.open(out) as kvz:
            assert kvz.token_ids == ids[0].tolist()
    bad = [
        (ids.repeat(2, 1), "one sequence"),
        (ids[:, 1:], "holds"),
        (ids.float(), "integers"),
        ([1.5] * ids.shape[1], "integers"),
        ([1, 2, "x"], "list of ints"),
        (torch.full_like(ids, 10_000), "vocabulary"),
    ]
    for form, message in bad:
        with pytest.raises(InputError, match=message):
            kvzip.save(cache, tmp_path / "bad.kvz", model=model, input_ids=form)
    assert not (tmp_path / "bad.kvz").exists()


def test_bad_arguments_are_one_line_errors(tiny_llama, tmp_path):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = doc_ids(tok)
    cache = prefill(model, ids)
    out = tmp_path / "x.kvz"
    with pytest.raises(UnknownLevelError):
        kvzip.save(cache, out, model=model, input_ids=ids, level="tiny")
    with pytest.raises(InputError, match="tokenizer"):
        kvzip.save(cache, out, model=model, input_ids=ids, level="small", if_no_profile="calibrate")
    with pytest.raises(InputError, match="DynamicCache"):
        kvzip.save(layers_kv(cache), out, model=model, input_ids=ids)
    with pytest.raises(InputError, match="batch"):
        kvzip.save(prefill(model, ids.repeat(2, 1)), out, model=model, input_ids=ids)
    with pytest.raises(InputError, match="transformers causal LM"):
        kvzip.save(cache, out, model="HuggingFaceTB/SmolLM2-135M", input_ids=ids)
    with pytest.raises(InputError, match="dtype"):
        kvzip.save(cache, out, model=model, input_ids=ids, dtype="int8")
    kvzip.save(cache, out, model=model, input_ids=ids, dtype="bfloat16")
    with kvzip.open(out) as kvz:
        assert kvz.dtype == "bfloat16"
        with pytest.raises(IndexError):
            kvz.decode_chunk(len(kvz.chunks))
        with pytest.raises(UnknownLevelError):
            kvz.decode_chunk(0, level="balanced")
    with pytest.raises(UnknownLevelError):
        kvzip.load(out, model=model, level="balanced")
    assert kvzip.load(out, model=model, device="meta").layers[0].keys.device.type == "meta"
    loaded = kvzip.load(out, model=model)  # stored as bf16, handed back in the model's dtype
    assert loaded.layers[0].keys.dtype == torch.float32
    ref = cache.layers[0].keys.to(torch.bfloat16).float()
    assert torch.equal(loaded.layers[0].keys, ref)


def test_sliding_window_caches_longer_than_the_window_round_trip(tmp_path):
    from tiny import windowed_model

    model = windowed_model("gemma3", 16).model  # its sliding layers keep 15 tokens
    ids = torch.randint(0, 256, (1, 100))
    out = tmp_path / "long.kvz"
    kvzip.save(prefill(model, ids), out, model=model, input_ids=ids, chunk_tokens=25)
    with kvzip.open(out) as kvz:
        assert [kvz.layout.layer_width(i) for i in range(6)] == [15] * 5 + [100]
        assert [p.shape[2] for p in kvz.decode_chunk_layers(2)] == [0] * 5 + [25]
        assert [p.shape[2] for p in kvz.decode_chunk_layers(3)] == [15] * 5 + [25]
    loaded = kvzip.load(out, model=model)
    assert loaded.get_seq_length() == 100 and loaded.layers[0].keys.shape[2] == 15
    more = torch.cat([ids, torch.randint(0, 256, (1, 5))], dim=1)
    assert greedy(model, more, loaded) == greedy(model, more)


def test_continuing_right_after_the_stored_ids_needs_one_uncached_token(tiny_llama, tmp_path):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = doc_ids(tok)
    out = tmp_path / "doc.kvz"
    kvzip.save(prefill(model, ids), out, model=model, input_ids=ids)
    cache = kvzip.load(out, model=model)
    cache.crop(-1)  # drop the last cached token, as the README says
    assert greedy(model, ids, cache=copy.deepcopy(cache)) == greedy(model, ids)


def test_importing_kvzip_stays_cheap():
    code = ("import sys, kvzip; assert 'torch' not in sys.modules, 'torch imported';"
            "assert callable(kvzip.save) and 'torch' in sys.modules;"
            "assert {'save', 'load', 'open'} <= set(dir(kvzip)); import builtins;"
            "assert open is builtins.open")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "error"})


# ---------------------------------------------------------------------- README
def readme_example() -> str:
    text = README.read_text()
    section = text.split("### With a transformers model and cache", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.model
def test_readme_example_runs(real_model, tmp_path, monkeypatch):
    """The README's example, as written, on the embedded model (loaded once per session:
    its two from_pretrained calls hand back the session's model and tokenizer)."""
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_model.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model.model)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert (tmp_path / "apache.kvz").is_file()
    assert np.isfinite(namespace["summary"].ratio)
