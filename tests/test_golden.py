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

from kvzip.formats import open_kvz

GOLDEN_DIRS = sorted((Path(__file__).parent / "fixtures").glob("v[0-9]*"))
GOLDEN_FILES = [path for d in GOLDEN_DIRS for path in sorted(d.glob("*.kvz"))]


def _expected(path: Path) -> dict:
    return json.loads((path.parent / "expected.json").read_text(encoding="utf-8"))[path.name]


def test_golden_files_exist():
    assert {p.parent.name for p in GOLDEN_FILES} >= {"v1"}
    assert len(GOLDEN_FILES) >= 3


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_file_decodes(path: Path):
    expected = _expected(path)
    with open_kvz(path) as reader:
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
