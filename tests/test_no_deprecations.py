"""kvzip's calls into transformers use its current API: no deprecation warning.

pyproject's ``filterwarnings`` turns such warnings into errors for the whole suite;
this test enforces the rule on its own, whatever the filters say, by recording every
warning (Python's and transformers' logged ones) while each model entry point runs on
a tiny model of every supported family.  A transformers release that deprecates an
argument kvzip passes fails here long before the release that removes it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import TEXT
from tiny import FAMILIES, save_tiny_model, tiny_model

from kvzip.model import KVModel
from kvzip.model.calibration import capture, output_gram

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_deprecations() -> Iterator[None]:
    """Fail if the body raises a deprecation warning or transformers logs one.

    transformers reports some renames through its logger (``warning_once``) rather than
    ``warnings``; the suite runs it at verbosity "error", so it is lowered to "warning"
    here and the once-only memo is cleared, so an earlier test cannot hide a message.
    """
    from transformers.utils import logging as hf_logging

    memo = getattr(hf_logging, "warning_once", None)
    if hasattr(memo, "cache_clear"):
        memo.cache_clear()
    logger = hf_logging.get_logger()  # the "transformers" root logger
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    found = [
        f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}"
        for w in caught
        if issubclass(w.category, DEPRECATIONS)
    ]
    found += [
        f"transformers log ({r.name}): {r.getMessage()}"
        for r in handler.records
        if "deprecat" in r.getMessage().lower()
    ]
    assert not found, "kvzip's model calls raised deprecations:\n" + "\n".join(found)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> KVModel:
    return tiny_model(request.param)


def test_model_calls_raise_no_deprecation(family_model):
    km = family_model
    chat = km.chat_template()
    doc = km.document_ids(TEXT[:100], chat)  # the prompt and 4 new tokens fit Mistral's window
    ids = doc + km.prompt_ids("What jumps?", chat)
    with no_deprecations():
        kv = km.prefill(doc, step=50).dense
        longer = km.extend(kv, ids[len(doc) :], step=7).dense
        km.extend_at(kv, ids[len(doc) :], range(len(doc), len(ids)))
        km.teacher_force(kv, ids[len(doc) :])
        km.generate(ids, kv=kv, max_new_tokens=4)
        km.generate(ids, max_new_tokens=4)
        km.generate_timed(ids, kv=longer, max_new_tokens=2)
        capture(km, doc[:40])
        output_gram(km)
    assert longer.shape[3] == len(ids)


def test_loading_raises_no_deprecation(tmp_path):
    directory = save_tiny_model(tmp_path / "tiny", "llama")
    with no_deprecations():
        km = KVModel.load(str(directory))
        km.identity()
        kv = km.prefill(km.document_ids(TEXT, None)).dense
    assert kv.dtype in (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("kind", ["warning", "log"])
def test_the_guard_sees_both_channels(kind):
    """The check itself works, for warnings and for transformers' logged notices alike
    (even a notice transformers already logged once in this process)."""
    from transformers.utils import logging as hf_logging

    message = "`old_arg` is deprecated. Use `new_arg` instead."
    with pytest.raises(AssertionError, match="old_arg"):
        with no_deprecations():
            if kind == "warning":
                warnings.warn(message, FutureWarning, stacklevel=1)
            else:
                hf_logging.get_logger("transformers.test").warning_once(message)
