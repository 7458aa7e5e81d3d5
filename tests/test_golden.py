"""Every golden ``.kvz`` of a released version decodes to the hashes stored with it.

A reader or codec change that breaks files people already have fails here.
The files come from ``tests/fixtures/make_golden_v1.py`` and are never regenerated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kvzip.levels import open_cache

GOLDEN_DIRS = sorted((Path(__file__).parent / "fixtures").glob("v[0-9]*"))
# Each directory's expected.json names its exact (hash-checked) golden files.
GOLDEN_FILES = [
    d / name for d in GOLDEN_DIRS if (d / "expected.json").exists()
    for name in sorted(json.loads((d / "expected.json").read_text()))
]
# 2.x files with a position layout: expected_layout.json (tests/fixtures/make_golden_v2.py).
LAYOUT_FILES = [
    d / name for d in GOLDEN_DIRS if (d / "expected_layout.json").exists()
    for name in sorted(json.loads((d / "expected_layout.json").read_text()))
]


def _expected(path: Path) -> dict:
    return json.loads((path.parent / "expected.json").read_text(encoding="utf-8"))[path.name]


def test_golden_files_exist():
    assert {p.parent.name for p in GOLDEN_FILES} >= {"v1"}
    assert len(GOLDEN_FILES) >= 3


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_file_decodes(path: Path):
    expected = _expected(path)
    with open_cache(path) as reader:
        assert reader.verify(decode=True) == []
        assert reader.header.dtype == expected["dtype"]
        assert set(reader.header.level_names) == set(expected["levels"])
        for level, sha256 in expected["levels"].items():
            kv = reader.decode_level(level)
            assert list(kv.shape) == expected["shape"]
            assert hashlib.sha256(np.ascontiguousarray(kv).tobytes()).hexdigest() == sha256
        ids = reader.token_ids().astype("<i8")
        assert hashlib.sha256(ids.tobytes()).hexdigest() == expected["token_ids_sha256"]
        assert reader.chunk_texts() == expected["chunk_texts"]


LOSSY_FILES = [p for d in GOLDEN_DIRS for p in sorted(d.glob("golden_lossy_*.kvz"))]


def test_lossy_golden_files_exist():
    assert len(LOSSY_FILES) >= 2


@pytest.mark.parametrize("path", LOSSY_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lossy_golden_file_decodes(path: Path):
    """Lossy files decode to the stored arrays within float rounding of RoPE's cos/sin."""
    expected = json.loads((path.parent / "expected_lossy.json").read_text())[path.name]
    with open_cache(path) as reader:
        assert reader.verify(decode=True) == []
        for level, npy in expected["decoded"].items():
            want = np.load(path.parent / npy)
            got = reader.decode_level(level)
            assert got.dtype == want.dtype and list(got.shape) == expected["shape"]
            if got.dtype == np.uint16:  # bfloat16 bit patterns: compare values
                got = (got.astype(np.uint32) << 16).view(np.float32)
                want = (want.astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4)
        ids = reader.token_ids().astype("<i8")
        assert hashlib.sha256(ids.tobytes()).hexdigest() == expected["token_ids_sha256"]


PROFILE_FILES = [p for d in GOLDEN_DIRS for p in sorted(d.glob("golden_profile_*.kvz"))]


def test_profile_golden_files_exist():
    assert PROFILE_FILES


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_profile_golden_file_decodes(path: Path, monkeypatch):
    """The calibrated codec and the param2 layout decode as they did, with their profile;
    without it, decoding is a ProfileNotFoundError."""
    from kvzip.errors import ProfileNotFoundError
    from kvzip.levels import profiles as profile_mod

    expected = json.loads((path.parent / "expected_profile.json").read_text())[path.name]
    monkeypatch.setattr(profile_mod, "_LOADED", {})
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(path.parent / "empty-profile-dir"))
    with open_cache(path) as reader:
        with pytest.raises(ProfileNotFoundError):
            reader.decode_level("balanced")
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(path.parent / "profiles"))
    with open_cache(path) as reader:
        assert reader.verify(decode=True) == []
        assert {lv.codec.get("profile") for lv in reader.header.levels} >= {expected["profile"]}
        for level, npy in expected["decoded"].items():
            want = np.load(path.parent / npy)
            got = reader.decode_level(level)
            assert got.dtype == want.dtype and list(got.shape) == expected["shape"]
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4)
        ids = reader.token_ids().astype("<i8")
        assert hashlib.sha256(ids.tobytes()).hexdigest() == expected["token_ids_sha256"]


def test_layout_golden_files_exist():
    assert {p.name for p in LAYOUT_FILES} >= {"golden_windowed_f32.kvz", "golden_irregular_f32.kvz"}


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_layout_golden_file_decodes(path: Path):
    """A windowed (hybrid model) and an irregular (per-head) layout decode as they did:
    lossless bit for bit, the lossy level within float rounding of RoPE's cos/sin."""
    expected = json.loads((path.parent / "expected_layout.json").read_text())[path.name]
    with open_cache(path) as reader:
        assert reader.version == (2, 0) and "positions" in reader.header.features
        assert reader.verify(decode=True) == []
        layout = reader.header.layout
        assert [layout.layer_width(i) for i in range(layout.num_layers)] == expected["widths"]
        for level, want in expected["levels"].items():
            got = reader.decode_layers(level)
            if "sha256" in want:
                h = hashlib.sha256()
                for layer in got.layers:
                    h.update(np.ascontiguousarray(layer).tobytes())
                assert h.hexdigest() == want["sha256"]
            else:
                arrays = np.load(path.parent / want["arrays"])
                for i, layer in enumerate(got.layers):
                    np.testing.assert_allclose(layer, arrays[f"arr_{i}"], rtol=1e-2, atol=1e-4)
        ids = reader.token_ids().astype("<i8")
        assert hashlib.sha256(ids.tobytes()).hexdigest() == expected["token_ids_sha256"]
