"""The passage store: reading and splitting documents, the index, artifacts, resume, gc, verify."""

from __future__ import annotations

import json
import multiprocessing
import sys
import uuid
from pathlib import Path

import pytest
import torch

from kvzip.errors import EmptyTextError, InputError, UnknownLevelError
from kvzip.model import KVModel
from kvzip.store import PassageStore, ask, check_level, precache, read_documents, split_document
from kvzip.store.documents import Document
from kvzip.store.index import StoreIndex
from kvzip.store.precache import tokenizer_with_offsets

TOPICS = {
    "volcano.txt": (
        "Krakatoa erupted in August 1883. The explosion was heard thousands of kilometres away.\n\n"
        "Ash from the volcano darkened skies around the world for months. "
    ),
    "cats.txt": (
        "Cats purr when they are content. A cat sleeps for most of the day.\n\n"
        "Kittens learn to hunt by watching their mother stalk mice. "
    ),
    "bread.txt": (
        "Bread rises because yeast ferments sugar and releases carbon dioxide.\n\n"
        "Bakers knead the dough to develop gluten, which traps the gas. "
    ),
}
PASSAGE_TOKENS = 96  # the byte-level tokenizer: one token per byte


@pytest.fixture(scope="module")
def km(tiny_model_dir) -> KVModel:
    return KVModel.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, text in TOPICS.items():
        (root / name).write_text(text * 3)
    return root


def fill(store_dir: Path, docs: Path, km: KVModel, **kwargs):
    with PassageStore(store_dir, create=True, artifacts=kwargs.pop("artifacts", None)) as store:
        return precache([docs], store, km, passage_tokens=PASSAGE_TOKENS, level="lossless", **kwargs)


# ---------------------------------------------------------------- documents
def test_read_documents_walks_directories_and_skips_binaries(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "empty.txt").write_text("  \n")
    docs = read_documents([tmp_path])
    assert [Path(d.key).name for d in docs] == ["a.txt", "b.md"]


def test_read_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"id": "x1", "text": "first"}) + "\n\n" + json.dumps({"id": 7, "text": "second"}) + "\n"
    )
    docs = read_documents([path])
    assert [(d.key, d.text, d.source) for d in docs] == [
        ("x1", "first", f"{path}:1"),
        ("7", "second", f"{path}:3"),
    ]


@pytest.mark.parametrize(
    "line, needle",
    [("{not json", "line 1: not JSON"), ('{"id": "a"}', "line 1: expected"), ('["a", "b"]', "expected")],
)
def test_bad_jsonl(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=needle):
        read_documents([path])


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="document not found"):
        read_documents([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyTextError, match="holds no text"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(EmptyTextError, match="no text documents"):
        read_documents([tmp_path / "d"])


def test_split_prefers_paragraphs_then_sentences(km):
    tokenize = tokenizer_with_offsets(km)
    para = "One two three. Four five six.\n\n"
    doc = Document("d", "d", para * 6)
    passages = split_document(doc, tokenize, 80)
    assert "".join(p.text for p in passages) == doc.text
    assert sum(len(p.token_ids) for p in passages) == len(tokenize(doc.text)[0])
    assert all(len(p.token_ids) <= 80 for p in passages)
    assert all(p.text.endswith("\n\n") for p in passages[:-1])
    # No paragraph break within reach: cut after a sentence.
    doc = Document("s", "s", "A short sentence here. " * 20)
    for p in split_document(doc, tokenize, 50)[:-1]:
        assert p.text.endswith(". ")


def test_split_without_boundaries_cuts_at_the_limit(km):
    tokenize = tokenizer_with_offsets(km)
    doc = Document("x", "x", "x" * 250)
    assert [len(p.token_ids) for p in split_document(doc, tokenize, 100)] == [100, 100, 50]
    # Never inside a multi-byte character when a character boundary is near.
    doc = Document("u", "u", "é" * 120)
    for p in split_document(doc, tokenize, 51):
        assert len(p.token_ids) % 2 == 0 and "\ufffd" not in p.text


# -------------------------------------------------------------------- store
def test_precache_is_idempotent_and_content_addressed(km, docs, tmp_path):
    first = fill(tmp_path / "s", docs, km)
    assert first.documents == 3 and first.cached == first.unique_passages > 3
    assert first.unique_passages < first.passages  # each text is repeated: identical passages share
    again = fill(tmp_path / "s", docs, km)
    assert (again.cached, again.already_cached) == (0, first.unique_passages)
    with PassageStore(tmp_path / "s") as store:
        info = store.info()
        names = sorted(f.name for f in store.artifacts.listing())
        assert names == sorted(store.index.artifact_names())
    assert info["passages_without_cache"] == 0
    assert info["caches"][0]["artifacts"] == first.unique_passages


def test_resume_after_a_crash(km, docs, tmp_path):
    def crash_after_two(stage, done, total):
        if stage == "precache" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "s", docs, km, progress=crash_after_two)
    resumed = fill(tmp_path / "s", docs, km)
    assert resumed.already_cached == 2 and resumed.cached == resumed.unique_passages - 2
    with PassageStore(tmp_path / "s") as store:
        assert store.verify().ok
        assert not [f for f in store.artifacts.listing() if f.temporary]


def _kill_before_the_first_row(monkeypatch):
    """The next run is killed between its first artifact's file and its row in the index."""
    real = StoreIndex.add_artifact

    def fail_once(self, record):
        monkeypatch.setattr(StoreIndex, "add_artifact", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreIndex, "add_artifact", fail_once)


def test_an_artifact_written_but_not_recorded_is_adopted(km, docs, tmp_path, monkeypatch):
    _kill_before_the_first_row(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "s", docs, km)
    resumed = fill(tmp_path / "s", docs, km)
    assert resumed.adopted == 1 and resumed.cached == resumed.unique_passages - 1


def test_a_kept_passage_is_weighed_by_its_keep_scorer_and_adopted_as_such(km, docs, tmp_path, monkeypatch):
    """precache --keep at a lossy level weighs the kept entries by the scorer it dropped by
    (as encode --keep), and records that scorer: in the summary, the artifact's header and
    the name it is looked up by, so an artifact killed before its row is adopted."""
    kwargs = dict(passage_tokens=PASSAGE_TOKENS, level="balanced", if_no_profile="uncalibrated",
                  keep=0.5, keep_by="keynorm")
    _kill_before_the_first_row(monkeypatch)
    with PassageStore(tmp_path / "s", create=True) as store, pytest.raises(KeyboardInterrupt):
        precache([docs], store, km, **kwargs)
    with PassageStore(tmp_path / "s") as store:
        resumed = precache([docs], store, km, **kwargs)
        assert resumed.importance == "keynorm"
        assert resumed.adopted == 1 and resumed.cached == resumed.unique_passages - 1
        for name in store.index.artifact_names():
            with store.artifacts.open(name) as reader:
                assert reader.header.raw["importance"]["scorer"] == reader.header.raw["keep"]["scorer"] == "keynorm"


def test_a_passage_another_run_recorded_first_is_not_counted_twice(km, docs, tmp_path, monkeypatch):
    precache_module = sys.modules["kvzip.store.precache"]  # the package re-exports a function by that name
    real = precache_module.cache_passage
    calls = []

    def beaten_to_it(km_, job, artifacts):
        record = real(km_, job, artifacts)
        if not calls:  # a concurrent run records this passage while we were writing it
            with PassageStore(tmp_path / "s") as other:
                assert other.index.add_artifact(record)
        calls.append(job.name)
        return record

    monkeypatch.setattr(precache_module, "cache_passage", beaten_to_it)
    summary = fill(tmp_path / "s", docs, km)
    assert len(calls) == summary.unique_passages
    assert summary.cached == summary.unique_passages - 1 and summary.already_cached == 1
    with PassageStore(tmp_path / "s") as store:
        assert store.info()["caches"][0]["artifacts"] == summary.unique_passages


def _precache_in_child(km, store_dir, docs, start, results) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
    start.wait()  # both children begin together
    with PassageStore(store_dir, create=True) as store:
        summary = precache([docs], store, km, passage_tokens=48, level="lossless")
    results.put((summary.cached, summary.already_cached, summary.adopted))


def test_two_concurrent_runs_share_a_store(km, docs, tmp_path):
    # Forked children start in milliseconds with the model already loaded; each
    # opens its own SQLite connection, as two separate `kvzip precache` would.
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    runs = [
        ctx.Process(target=_precache_in_child, args=(km, tmp_path / "s", docs, start, results))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
        assert run.exitcode == 0
    counts = [results.get(timeout=5) for _ in runs]
    with PassageStore(tmp_path / "s") as store:
        info = store.info()
        report = store.verify()
        files = store.artifacts.listing()
    unique = info["caches"][0]["artifacts"]
    assert report.ok and report.unindexed == 0 and not [f for f in files if f.temporary]
    assert len(files) == unique and info["passages_without_cache"] == 0
    # Each run accounts for every passage, and each artifact is credited to one run only.
    assert all(cached + known + adopted == unique for cached, known, adopted in counts)
    assert sum(cached + adopted for cached, _, adopted in counts) == unique


def test_artifacts_on_an_fsspec_url(km, docs, tmp_path):
    url = f"memory://kvzip-test-{uuid.uuid4().hex}/artifacts"
    summary = fill(tmp_path / "s", docs, km, artifacts=url)
    assert not (tmp_path / "s" / "artifacts").exists()
    with PassageStore(tmp_path / "s") as store:  # the store remembers where its artifacts are
        assert store.artifacts.url == url
        assert store.verify().ok and store.info()["caches"][0]["artifacts"] == summary.cached
        result = ask(store, "When did Krakatoa erupt?", km, top_k=1, max_new_tokens=2, compare=False)
    assert Path(result.sources[0].doc_key).name == "volcano.txt"
    with pytest.raises(InputError, match="keeps its artifacts at"):
        PassageStore(tmp_path / "s", artifacts="memory://elsewhere")


def test_verify_catches_a_corrupted_artifact(km, docs, tmp_path):
    fill(tmp_path / "s", docs, km)
    with PassageStore(tmp_path / "s") as store:
        victim = sorted(store.index.artifact_names())[0]
        path = Path(store.artifacts.path(victim))
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # inside the last payload
        path.write_bytes(bytes(data))
        report = store.verify()
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith(victim)
    assert "checksum" in report.problems[0]


def test_gc_removes_orphans_and_dangling_rows(km, docs, tmp_path):
    fill(tmp_path / "s", docs, km)
    with PassageStore(tmp_path / "s") as store:
        names = sorted(store.index.artifact_names())
        root = Path(store.artifacts.root)
        (root / names[0]).unlink()  # dangling row
        (root / "zz").mkdir()
        (root / "zz" / "orphan.kvz").write_bytes((root / names[1]).read_bytes())
        (root / "zz" / ".orphan.kvz.123.tmp").write_bytes(b"half a file")
        report = store.gc()
        assert report.dangling_rows == [names[0]]
        assert report.orphan_files == report.temporaries == []  # too young: a running precache may own them
        report = store.gc(grace_seconds=0)
        assert report.orphan_files == ["zz/orphan.kvz"] and report.temporaries == ["zz/.orphan.kvz.123.tmp"]
        assert store.verify().ok
    # Re-splitting the documents makes the old passages' caches unreferenced.
    with PassageStore(tmp_path / "s") as store:
        precache([docs], store, km, passage_tokens=PASSAGE_TOKENS // 2, level="lossless")
        report = store.gc(grace_seconds=0)
        assert len(report.unreferenced) == len(names) - 1
        assert store.verify().ok and store.verify().unreferenced == 0


def test_bm25_ranks_the_relevant_passage_first(km, docs, tmp_path):
    fill(tmp_path / "s", docs, km)
    with PassageStore(tmp_path / "s") as store:
        for question, expected in [
            ("Why does bread rise? yeast", "bread.txt"),
            ("How do kittens learn to hunt mice?", "cats.txt"),
            ("When did Krakatoa erupt?", "volcano.txt"),
        ]:
            result = ask(store, question, km, top_k=2, max_new_tokens=1, compare=False)
            assert Path(result.sources[0].doc_key).name == expected, question


def test_unknown_level_is_refused_before_any_work():
    with pytest.raises(UnknownLevelError, match="unknown level 'nope'"):
        check_level("nope")


def test_a_store_is_required(tmp_path, km):
    with pytest.raises(InputError, match="no kvzip store at"):
        PassageStore(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="must be a directory"):
        PassageStore(tmp_path / "file", create=True)


def test_precache_with_importance_is_its_own_artifact_and_asks(km, docs, tmp_path):
    """--importance scores each passage and weighs the level's steps by class: the artifact
    records the scorer, is addressed apart from the plain one, and `ask` decodes it."""
    from kvzip.store import ask

    kwargs = dict(passage_tokens=PASSAGE_TOKENS, level="balanced", if_no_profile="uncalibrated")
    with PassageStore(tmp_path / "s", create=True) as store:
        plain = precache([docs], store, km, **kwargs)
        weighted = precache([docs], store, km, importance="prefill", **kwargs)
        assert weighted.cached == plain.cached == plain.unique_passages  # distinct artifacts
        names = set(store.index.artifact_names())
        assert len(names) == 2 * plain.unique_passages
        again = precache([docs], store, km, importance="prefill", **kwargs)
        assert again.cached == 0
        recorded = []
        for name in names:
            with store.artifacts.open(name) as reader:
                recorded.append(reader.header.raw.get("importance", {}).get("scorer"))
        assert sorted(recorded, key=str) == sorted([None, "prefill"] * plain.unique_passages, key=str)
        result = ask(store, "Why does bread rise?", km, max_new_tokens=4, compare=False)
        assert len(result.new_token_ids) == 4
    with PassageStore(tmp_path / "t", create=True) as store:
        with pytest.raises(InputError, match="unknown importance scorer"):
            precache([docs], store, km, importance="psychic", **kwargs)
        with pytest.raises(InputError, match="codes every entry alike"):
            precache([docs], store, km, passage_tokens=PASSAGE_TOKENS, level="lossless", importance="prefill")


def test_precache_spends_bits_as_the_profile_says(km, docs, tmp_path):
    """A profile that turns prefill importance on weighs precache's passages as it weighs
    encode's; --importance none codes them uniformly again; a uniform profile weighs nothing."""
    from kvzip.codecs.profile import profile_to_bytes
    from kvzip.levels import write_profile
    from kvzip.levels.calibrate import CalibrationOptions, calibrate

    cal = "".join(TOPICS.values()) * 4
    data, _ = calibrate(km, [("a.txt", cal), ("b.txt", cal[::-1])], CalibrationOptions(tokens_per_text=320, continuation=64))
    uniform = write_profile(data, path=tmp_path / "uniform.kvzprofile")
    weighing = write_profile(profile_to_bytes(uniform.tensors, {**uniform.meta, "importance": "prefill"}),
                             path=tmp_path / "weighing.kvzprofile")
    assert uniform.importance is None
    got = {}
    for name, prof, asked in (("uniform", uniform, None), ("profile", weighing, None), ("none", weighing, "none")):
        with PassageStore(tmp_path / name, create=True) as store:
            summary = precache([docs], store, km, passage_tokens=PASSAGE_TOKENS, level="balanced",
                               profile=str(prof.path), importance=asked)
            scorers = set()
            for artifact in store.index.artifact_names():
                with store.artifacts.open(artifact) as reader:
                    scorers.add((reader.header.raw.get("importance") or {}).get("scorer"))
            got[name] = (summary.importance, scorers)
            result = ask(store, "Why does bread rise?", km, max_new_tokens=4, compare=False)
            assert len(result.new_token_ids) == 4
    assert got == {"uniform": (None, {None}), "profile": ("prefill", {"prefill"}), "none": (None, {None})}


def test_ask_prefers_a_passages_weighted_cache_unless_told(km, docs, tmp_path):
    """A store holding each passage uniform, by importance and pruned: ask, not told, uses
    the weighted cache (what precache stores by default where the profile weighs, and the
    closer one at the same size), --importance none the uniform one that keeps every
    entry, --keep the pruned one."""
    from kvzip.store.ask import _treatment, retrieve

    ways = [dict(importance="none"), dict(importance="prefill"), dict(keep=0.5, keep_by="keynorm", importance="none")]
    with PassageStore(tmp_path / "s", create=True) as store:
        kwargs = dict(passage_tokens=PASSAGE_TOKENS, level="balanced", if_no_profile="uncalibrated")
        for way in ways:
            precache([docs], store, km, **way, **kwargs)
        got = {}
        for name, asked in (("default", {}), ("none", dict(importance="none")), ("keep", dict(keep=0.5))):
            _, hits = retrieve(store, "Why does bread rise?", km, top_k=2, **asked)
            got[name] = {_treatment(store, h.artifact) for h in hits}
        result = ask(store, "Why does bread rise?", km, max_new_tokens=4, compare=False, importance="none")
        assert len(result.new_token_ids) == 4
    assert got == {"default": {("prefill", None)}, "none": {(None, None)}, "keep": {(None, 0.5)}}


@pytest.mark.parametrize("names", [("u", "w", "p"), ("p", "w", "u"), ("w", "p", "u")])
def test_the_cache_ask_takes_does_not_depend_on_the_order_the_store_lists_them(names, monkeypatch):
    """Artifacts are listed in the index's order (by name), not the order stored."""
    import importlib
    from types import SimpleNamespace

    ask_mod = importlib.import_module("kvzip.store.ask")  # the module, not the function
    ways = {"u": (None, None), "w": ("prefill", None), "p": (None, 0.5), "pw": ("prefill", 0.5)}
    monkeypatch.setattr(ask_mod, "_treatment", lambda store, name: ways[name])
    for listed in (names, (*names, "pw")):
        hit = SimpleNamespace(artifacts=listed, artifact=listed[0])

        def choose(hit=hit, **asked):
            return ask_mod._artifact_for(None, hit, asked.get("keep"), asked.get("importance"))
        assert choose() == "w"
        assert choose(importance="none") == "u"
        assert choose(importance="prefill") == "w"
        assert choose(keep=0.5) == ("pw" if "pw" in listed else "p")
        assert choose(keep=0.5, importance="none") == "p"
        assert choose(importance="keynorm") is None


def test_ask_recomputes_when_the_model_reads_faster_than_the_caches_decode(km, docs, tmp_path, monkeypatch):
    """On an accelerator, ask measures the first passage's decode and the model's prefill:
    a model that would read the whole context sooner recomputes it (exact), else the caches."""
    import importlib

    from kvzip.store import ask

    ask_module = importlib.import_module("kvzip.store.ask")  # the module (kvzip.store.ask is the function)

    with PassageStore(tmp_path / "s", create=True) as store:
        precache([docs], store, km, passage_tokens=PASSAGE_TOKENS, level="lossless")
        on_cpu = ask(store, "Why does bread rise?", km, max_new_tokens=4, top_k=3)
        assert on_cpu.context_source == "cache"
        monkeypatch.setattr(ask_module, "is_accelerator", lambda device: True)  # as on a GPU
        monkeypatch.setattr(type(km), "prefill_rate", lambda self, tokens=256: 1e12)
        fast = ask(store, "Why does bread rise?", km, max_new_tokens=4, top_k=3)
        assert fast.context_source == "recompute" and fast.baseline_identical
        assert fast.context_tokens == on_cpu.context_tokens
        monkeypatch.setattr(type(km), "prefill_rate", lambda self, tokens=256: 1e-3)
        assert ask(store, "Why does bread rise?", km, max_new_tokens=4, top_k=3).context_source == "cache"


def test_precache_keep_stores_kept_entries_and_ask_moves_them(km, docs, tmp_path):
    """--keep drops entries of each passage: its own artifacts (the header records the
    rule and scorer), and the assembled context holds exactly the kept entries, moved to
    their offsets as the whole passages' entries are."""
    import numpy as np

    from kvzip.store.ask import load_passages, prompt_ids, retrieve
    from kvzip.store.assemble import assemble

    kwargs = dict(passage_tokens=PASSAGE_TOKENS, level="lossless")
    question = "Why does bread rise?"
    with PassageStore(tmp_path / "s", create=True) as store:
        plain = precache([docs], store, km, **kwargs)
        kept = precache([docs], store, km, keep=0.5, keep_by="prefill", **kwargs)
        assert kept.cached == plain.cached == plain.unique_passages  # distinct artifacts
        assert kept.written_bytes < 0.7 * plain.written_bytes
        assert precache([docs], store, km, keep=0.5, keep_by="prefill", **kwargs).cached == 0
        names = store.index.artifact_names()
        records = []
        for name in names:
            with store.artifacts.open(name) as reader:
                records.append(reader.header.raw.get("keep"))
        assert sum(r is not None and r["scorer"] == "prefill" and r["fraction"] == 0.5 for r in records) \
            == plain.unique_passages
        # both ways cached in one store: ask uses the plain caches unless told --keep
        def kept_by(result):
            out = []
            for source in result.sources:
                with store.artifacts.open(source.artifact) as reader:
                    out.append((reader.header.raw.get("keep") or {}).get("fraction"))
            return out

        default = ask(store, question, km, max_new_tokens=2, top_k=3, compare=False)
        assert kept_by(default) == [None] * len(default.sources)
        chosen = ask(store, question, km, max_new_tokens=2, top_k=3, compare=False, keep=0.5)
        assert kept_by(chosen) == [0.5] * len(chosen.sources)
        assert [s.passage for s in chosen.sources] == [s.passage for s in default.sources]
        with pytest.raises(InputError, match="stored with --keep 0.3"):
            ask(store, question, km, max_new_tokens=2, compare=False, keep=0.3)
    before, _ = prompt_ids(km, question)
    # the same passages, once kept and once whole: the kept entries are the whole ones' subset
    with PassageStore(tmp_path / "k", create=True) as only_kept, PassageStore(tmp_path / "p", create=True) as only_plain:
        precache([docs], only_kept, km, keep=0.5, keep_by="prefill", **kwargs)
        precache([docs], only_plain, km, **kwargs)
        _, hits_k = retrieve(only_kept, question, km, top_k=3)
        _, hits_p = retrieve(only_plain, question, km, top_k=3)
        assert [h.token_sha256 for h in hits_k] == [h.token_sha256 for h in hits_p]
        pruned = load_passages(only_kept, hits_k, km, "lossless")
        whole = load_passages(only_plain, hits_p, km, "lossless")
        assert all(p.is_pruned for p in pruned) and not any(p.is_pruned for p in whole)
        context, kv = assemble(km, before, pruned)
        same, dense = assemble(km, before, whole)
        assert context == same
        assert kv.layout.stored() < 0.75 * km.num_layers * km.kv_heads * len(context)
        for i, heads in enumerate(kv.layout.positions):
            for h, held in enumerate(heads):
                assert np.all(held[: len(before)] == np.arange(len(before)))  # the opening, whole
                torch.testing.assert_close(kv.layers[i][:, h, : held.size], dense[:, i, h, held])
        result = ask(only_kept, question, km, max_new_tokens=4, blend_recompute=0.2)
        assert len(result.new_token_ids) == 4 and result.baseline_identical is not None
    with PassageStore(tmp_path / "t", create=True) as store:
        with pytest.raises(InputError, match="--keep must be a fraction"):
            precache([docs], store, km, keep=1.5, **kwargs)
