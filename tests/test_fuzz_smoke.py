"""The fuzz harnesses (``fuzz/``) inside ``make test``: a short seeded run of every
target, every finding ever kept replayed, and the seed corpus checked against the
golden files it comes from.  The long campaign is ``make fuzz`` (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from fuzz import make_corpus
from fuzz import targets as T
from fuzz.run import REGRESSIONS, run_target

SMOKE_RUNS = 300  # per target, seed 1: a few seconds each, mostly the process start


def regression_files(target: str) -> list[Path]:
    folder = REGRESSIONS / target
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def test_every_regression_folder_names_a_target():
    folders = [p.name for p in REGRESSIONS.iterdir() if p.is_dir()] if REGRESSIONS.is_dir() else []
    assert set(folders) <= set(T.TARGETS), sorted(set(folders) - set(T.TARGETS))


@pytest.mark.parametrize("target", [t for t in T.TARGETS if regression_files(t)])
def test_fuzz_findings_stay_fixed(target: str):
    """Each input a campaign once found a problem with, replayed through its target in a
    fresh process (a crash there must not take pytest with it)."""
    files = regression_files(target)
    proc = subprocess.run([sys.executable, "-m", "fuzz.harness", target, "--replay", *map(str, files)],
                          cwd=ROOT, env={**os.environ, **T.environment()}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


@pytest.fixture
def golden_profiles(monkeypatch):
    """The golden files' profile findable, and this process's loaded profiles restored afterwards."""
    from kvzip.levels import profiles as profile_mod

    monkeypatch.setattr(profile_mod, "_LOADED", dict(profile_mod._LOADED))
    T.register_golden_profiles()


def test_seed_corpus_is_what_make_corpus_derives(golden_profiles):
    """fuzz/corpus/ is derived from the golden files; rerun ``python -m fuzz.make_corpus``
    when they (or the seed rules) change."""
    expected = make_corpus.all_seeds()
    for target, seeds in expected.items():
        folder = T.CORPUS / target
        on_disk = {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}
        assert sorted(on_disk) == sorted(seeds), target
        stale = [name for name, data in seeds.items() if on_disk[name] != data]
        assert not stale, f"{target}: {stale} differ from what make_corpus derives"
    assert sorted(expected) == sorted(T.TARGETS)


def test_seeds_are_valid_inputs(golden_profiles):
    """Every seed is accepted where it came from (mutations start from inputs that reach
    the whole decoder, not from ones refused at the door)."""
    from kvzip.codecs import _rans
    from kvzip.codecs.entropy import RangeCoder
    from kvzip.errors import KvzipError

    for target in T.PAYLOADS:
        contexts = T.payload_contexts(target)
        for path in sorted((T.CORPUS / target).iterdir()):
            decoded = 0
            for decoder, entry, _ in contexts:
                try:
                    kv = decoder.decode(entry, path.read_bytes())
                except KvzipError:
                    continue
                assert np.isfinite(kv.astype(np.float32)).all()
                decoded += 1
            assert decoded, f"{target}/{path.name} decodes as none of the golden chunks"
    for layout in T.ENTROPY_LAYOUTS:
        for path in sorted((T.CORPUS / f"entropy-{layout}").iterdir()):
            block, shape = T.entropy_input_to_block(path.read_bytes())
            assert RangeCoder(layout).decode(block, shape).shape == shape
    tables = T._constant_tables()
    for path in sorted((T.CORPUS / "rans-c").iterdir()):
        name, args = T.decode_c_call(path.read_bytes(), tables)
        getattr(_rans, name)(*args)  # no ValueError: a call kvzip itself made
    from kvzip.formats import BytesSource
    from kvzip.levels import open_cache

    for path in sorted((T.CORPUS / "container").iterdir()):
        assert open_cache(BytesSource(path.read_bytes())).verify(decode=True) == []


@pytest.mark.parametrize("target", list(T.TARGETS))
def test_fuzz_smoke(target: str, tmp_path: Path):
    """A short coverage-guided run (atheris, seed 1) over the seeds and regression files:
    nothing but KvzipErrors, no crash, no hang, no runaway memory."""
    pytest.importorskip("atheris", reason="atheris is in the test extra: pip install -e '.[test]'")
    result = run_target(T.TARGETS[target], runs=SMOKE_RUNS, seed=1, work=tmp_path / "work",
                        crashes=tmp_path / "crashes", timeout=60, quiet=True)
    assert result.status == "ok", (f"{target}: {result.status} after {result.runs} inputs\n{result.finding}\n"
                                   f"input: {result.artifact}\nlog: {result.log}")
    assert result.runs >= SMOKE_RUNS
