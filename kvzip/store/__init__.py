"""RAG pre-cache store: passage artifacts, SQLite index and retrieval.

``precache`` splits documents into passages and stores each passage's cache;
``ask`` retrieves passages by BM25, moves their caches into one prompt and
generates.  The store is a directory (``index.sqlite``) plus artifacts on any
fsspec URL.
"""

from kvzip.store.ask import AskResult, Fidelity, Source, ask, fidelity, prompt_ids, retrieve
from kvzip.store.assemble import CachedPassage, assemble, move_kv, rotate_keys
from kvzip.store.documents import (
    DEFAULT_PASSAGE_TOKENS,
    Document,
    Passage,
    read_documents,
    split_document,
)
from kvzip.store.opening import load_opening, opening_ids, save_opening
from kvzip.store.precache import ENGINES, PrecacheSummary, check_level, precache
from kvzip.store.store import GcReport, PassageStore, StoreVerifyReport

__all__ = [
    "DEFAULT_PASSAGE_TOKENS",
    "ENGINES",
    "AskResult",
    "CachedPassage",
    "Document",
    "Fidelity",
    "GcReport",
    "Passage",
    "PassageStore",
    "PrecacheSummary",
    "Source",
    "StoreVerifyReport",
    "ask",
    "assemble",
    "check_level",
    "fidelity",
    "load_opening",
    "opening_ids",
    "move_kv",
    "precache",
    "prompt_ids",
    "read_documents",
    "retrieve",
    "rotate_keys",
    "save_opening",
    "split_document",
]
