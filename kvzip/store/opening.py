"""The prompt's fixed opening, cached once per model instead of prefilled at every ask.

An ``ask`` prompt starts with the chat template's opening (the system turn and the
start of the user turn: a few dozen tokens, the same for every question).  Its
cache sits at positions 0..n-1 with nothing before it, so it depends only on the
model and those token ids, like a passage's.  ``precache`` prefills it once and
keeps it in the store's index as a small ``lossless`` ``.kvz`` (bit-exact, with the
format's checksums), named by the same content address as an artifact; ``ask``
reads it from there (or from this process's memory, after the first time) and
prefills it only when the store has none (a store filled by an older kvzip).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvzip.errors import KvzipError
from kvzip.formats import BytesSource
from kvzip.levels import DEFAULT_CHUNK_TOKENS, open_cache, storage_to_kv, write_kvz
from kvzip.store.artifacts import artifact_name
from kvzip.store.documents import token_sha256

if TYPE_CHECKING:  # torch and the model load when a passage is read or assembled
    import torch

    from kvzip.model import KVModel
    from kvzip.store.store import PassageStore

OPENING_LEVEL = "lossless"
# name -> cache; one entry per model (and opening) this process has used.
_MEMORY: dict[str, torch.Tensor] = {}
_LOCK = threading.Lock()


def opening_ids(km: KVModel) -> list[int]:
    """The ids every ask prompt starts with (before the passages)."""
    chat = km.chat_template()
    if chat is None:
        return km.encode_text("", special_tokens=True)
    return km.encode_text(chat.prefix, special_tokens=False)


def opening_name(km: KVModel, ids: Sequence[int]) -> str:
    return artifact_name(km.identity()["fingerprint"], OPENING_LEVEL, km.dtype, token_sha256(ids))


def forget_openings() -> None:
    """Drop the in-memory copies (tests, and timing a cold ask)."""
    with _LOCK:
        _MEMORY.clear()


def save_opening(store: PassageStore, km: KVModel) -> bool:
    """Prefill the opening and keep it in ``store`` unless it is there; True if written."""
    ids = opening_ids(km)
    if not ids:
        return False
    name = opening_name(km, ids)
    if store.index.opening(name) is not None:
        return False
    kv = km.prefill(ids).dense_array("a chat opening")
    with tempfile.TemporaryDirectory(prefix="kvzip-opening-") as tmp:
        path = Path(tmp) / "opening.kvz"
        write_kvz(kv, ids, path, km, levels=[OPENING_LEVEL], chunk_tokens=DEFAULT_CHUNK_TOKENS,
                  dtype=km.dtype, chunk_texts=False)
        data = path.read_bytes()
    store.index.add_opening(name, km.identity()["fingerprint"], km.dtype, token_sha256(ids), len(ids), data)
    with _LOCK:
        _MEMORY[name] = kv
    return True


def read_opening(data: bytes, km: KVModel, ids: Sequence[int]) -> torch.Tensor:
    """A stored opening's cache, checked against the model and the ids (KvzipError if not)."""
    with open_cache(BytesSource(data)) as reader:
        km.check_stored_cache(reader.header)
        if reader.token_ids().tolist() != list(ids):
            raise KvzipError("the stored opening holds other token ids")
        return storage_to_kv(reader.decode_level(OPENING_LEVEL, decoders=1), reader.header.dtype)


def load_opening(
    km: KVModel, ids: Sequence[int], store: PassageStore | None = None
) -> tuple[torch.Tensor, str]:
    """(the cache of ``ids`` at positions 0..n-1, where it came from: ``memory``, ``store``
    or ``prefill``).  A stored opening that fails its checks is prefilled instead."""
    name = opening_name(km, ids)
    with _LOCK:
        kv = _MEMORY.get(name)
    if kv is not None:
        return kv, "memory"
    source = "prefill"
    data = store.index.opening(name) if store is not None else None
    if data is not None:
        try:
            kv, source = read_opening(data, km, ids), "store"
        except KvzipError:
            kv = None  # damaged: `store verify` reports it; recompute here
    if kv is None:
        kv = km.prefill(ids).dense_array("a chat opening")
    with _LOCK:
        _MEMORY[name] = kv
    return kv, source
