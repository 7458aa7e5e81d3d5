"""The store's index: one SQLite file with passages, their BM25 full-text index, and artifacts.

SQLite is embedded (no service to run) and FTS5 ranks by BM25 out of the box.
The file is in WAL mode and every write is one short ``BEGIN IMMEDIATE``
transaction, so several pre-cache runs can share a store: writers queue on the
lock (waiting up to ``busy_timeout``) instead of failing or interleaving.

Passages and artifacts are separate tables because they are keyed differently:
a passage is a place in a document (document key, tokenizer, number), an artifact
is a cache of some token ids under one model and codec.  Identical passages in two
documents share one artifact; a passage whose artifact is not written yet is
simply not retrievable.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvzip.errors import FormatError, InputError, KvzipError
from kvzip.store.documents import Passage

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 120.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models ("
    " fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, identity TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS passages ("
    " id INTEGER PRIMARY KEY,"
    " doc_key TEXT NOT NULL, source TEXT NOT NULL, number INTEGER NOT NULL,"
    " tokenizer TEXT NOT NULL, token_sha256 TEXT NOT NULL, tokens INTEGER NOT NULL,"
    " text TEXT NOT NULL,"
    " UNIQUE (doc_key, tokenizer, number))",
    "CREATE INDEX IF NOT EXISTS passages_by_tokens ON passages (token_sha256)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS passage_fts USING fts5 ("
    " text, content='passages', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER IF NOT EXISTS passages_fts_insert AFTER INSERT ON passages BEGIN"
    " INSERT INTO passage_fts (rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS passages_fts_delete AFTER DELETE ON passages BEGIN"
    " INSERT INTO passage_fts (passage_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TABLE IF NOT EXISTS artifacts ("
    " name TEXT PRIMARY KEY,"
    " model TEXT NOT NULL, level TEXT NOT NULL, codec_sha256 TEXT NOT NULL, dtype TEXT NOT NULL,"
    " token_sha256 TEXT NOT NULL, tokens INTEGER NOT NULL, bytes INTEGER NOT NULL,"
    " created TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS artifacts_by_tokens ON artifacts (token_sha256, model, level)",
    # The prompt's fixed opening (chat template's system turn and start of the user turn),
    # one small lossless .kvz per model, kept in the index itself (see store/opening.py).
    "CREATE TABLE IF NOT EXISTS openings ("
    " name TEXT PRIMARY KEY, model TEXT NOT NULL, dtype TEXT NOT NULL,"
    " token_sha256 TEXT NOT NULL, tokens INTEGER NOT NULL, data BLOB NOT NULL,"
    " created TEXT NOT NULL)",
)


@dataclass(frozen=True)
class ArtifactRecord:
    """One stored passage cache: where it is and what it holds."""

    name: str
    model: str  # model fingerprint
    level: str
    codec_sha256: str
    dtype: str
    token_sha256: str
    tokens: int
    bytes: int


@dataclass(frozen=True)
class Hit:
    """A retrieved passage with its BM25 score (lower is better, as FTS5 reports it)."""

    doc_key: str
    source: str
    number: int
    text: str
    token_sha256: str
    tokens: int
    score: float
    artifact: str
    # every artifact of the passage for the model and level (plain, --importance, --keep), sorted
    artifacts: tuple[str, ...] = ()


class StoreIndex:
    """The SQLite index of one store."""

    def __init__(self, path: Path, *, create: bool):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(
                f"no kvzip store at {self.path.parent} (create one with `kvzip precache DOCS "
                f"--store {self.path.parent}`)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            if "fts5" in str(exc):
                raise KvzipError("this Python's sqlite3 lacks FTS5, which the store needs") from None
            raise FormatError(f"{self.path} is not a kvzip store index: {exc}") from None

    def _enable_wal(self) -> None:
        """Switch to WAL, retrying: the switch needs the database to itself, and SQLite
        answers "locked" at once (without its busy timeout) while another run opens it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        with self.transaction():
            for statement in _SCHEMA:  # not executescript(): it would commit the transaction
                self.db.execute(statement)
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(row[0]) > SCHEMA_VERSION:
                raise FormatError(
                    f"{self.path} was written by a newer kvzip (index schema {row[0]}, this "
                    f"kvzip reads {SCHEMA_VERSION})"
                )

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------- plumbing
    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._set_meta(key, value)

    # ---------------------------------------------------------------- writes
    def add_model(self, identity: dict[str, Any]) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO models (fingerprint, name, identity) VALUES (?, ?, ?)",
                (identity["fingerprint"], identity.get("name", ""), json.dumps(identity)),
            )

    def replace_document(self, doc_key: str, tokenizer: str, passages: Sequence[Passage]) -> bool:
        """Make ``passages`` the document's passages for ``tokenizer``; False if already so."""
        wanted = [(p.number, p.token_sha256) for p in passages]
        with self.transaction():
            have = self.db.execute(
                "SELECT number, token_sha256 FROM passages WHERE doc_key = ? AND tokenizer = ? "
                "ORDER BY number",
                (doc_key, tokenizer),
            ).fetchall()
            if [tuple(row) for row in have] == wanted:
                return False
            self.db.execute(
                "DELETE FROM passages WHERE doc_key = ? AND tokenizer = ?", (doc_key, tokenizer)
            )
            self.db.executemany(
                "INSERT INTO passages (doc_key, source, number, tokenizer, token_sha256, tokens, "
                "text) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (p.doc_key, p.source, p.number, tokenizer, p.token_sha256, len(p.token_ids), p.text)
                    for p in passages
                ],
            )
        return True

    def add_artifact(self, record: ArtifactRecord) -> bool:
        """Record an artifact; False when a concurrent run recorded it first.

        Names are content addresses, so the first row stands and a second
        writer's identical file replaced nothing that matters.
        """
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.transaction():
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO artifacts (name, model, level, codec_sha256, dtype, "
                "token_sha256, tokens, bytes, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*asdict(record).values(), created),
            )
            return cursor.rowcount == 1

    def remove_artifacts(self, names: Iterable[str]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM artifacts WHERE name = ?", [(n,) for n in names])

    def add_opening(self, name: str, model: str, dtype: str, token_sha: str, tokens: int, data: bytes) -> None:
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO openings (name, model, dtype, token_sha256, tokens, data, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, model, dtype, token_sha, tokens, sqlite3.Binary(data), created),
            )

    def remove_opening(self, name: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM openings WHERE name = ?", (name,))

    # ----------------------------------------------------------------- reads
    def opening(self, name: str) -> bytes | None:
        """The stored opening cache (a whole .kvz file) named ``name``, if any."""
        row = self.db.execute("SELECT data FROM openings WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def opening_names(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT name FROM openings ORDER BY name")]

    def has_artifact(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM artifacts WHERE name = ?", (name,)).fetchone() is not None

    def artifact_names(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM artifacts")}

    def artifacts(self) -> list[ArtifactRecord]:
        rows = self.db.execute(
            "SELECT name, model, level, codec_sha256, dtype, token_sha256, tokens, bytes "
            "FROM artifacts ORDER BY name"
        )
        return [ArtifactRecord(*row) for row in rows]

    def unreferenced_artifacts(self) -> list[str]:
        """Artifacts whose token ids no passage holds any more (a document changed or was re-split)."""
        rows = self.db.execute(
            "SELECT name FROM artifacts a WHERE NOT EXISTS "
            "(SELECT 1 FROM passages p WHERE p.token_sha256 = a.token_sha256)"
        )
        return [row[0] for row in rows]

    def levels(self, model: str) -> list[str]:
        rows = self.db.execute(
            "SELECT level FROM artifacts WHERE model = ? GROUP BY level ORDER BY level", (model,)
        )
        return [row[0] for row in rows]

    def search(
        self, terms: Sequence[str], *, k: int, model: str, tokenizer: str, level: str
    ) -> list[Hit]:
        """The ``k`` best passages for ``terms`` (BM25, any term may match) that have a cache
        for ``model`` at ``level``; identical passages from different documents count once."""
        query = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        rows = self.db.execute(
            "SELECT p.doc_key, p.source, p.number, p.text, p.token_sha256, p.tokens, "
            "bm25(passage_fts) AS score, "
            "(SELECT GROUP_CONCAT(a.name, char(10)) FROM artifacts a WHERE a.token_sha256 = p.token_sha256 "
            " AND a.model = ?3 AND a.level = ?4) AS artifacts "
            "FROM passage_fts JOIN passages p ON p.id = passage_fts.rowid "
            "WHERE passage_fts MATCH ?1 AND p.tokenizer = ?2 AND artifacts IS NOT NULL "
            "ORDER BY score LIMIT ?5",
            (query, tokenizer, model, level, 4 * k),
        )
        hits: list[Hit] = []
        seen: set[str] = set()
        for row in rows:
            names = tuple(sorted(row[-1].split("\n")))
            hit = Hit(*row[:-1], names[0], names)
            if hit.token_sha256 not in seen:
                seen.add(hit.token_sha256)
                hits.append(hit)
        return hits[:k]

    def summary(self) -> dict[str, Any]:
        one = self.db.execute
        models = {
            fp: name for fp, name in one("SELECT fingerprint, name FROM models").fetchall()
        }
        caches = [
            {
                "model": models.get(model, model[:16]),
                "fingerprint": model,
                "level": level,
                "dtype": dtype,
                "artifacts": count,
                "tokens": tokens,
                "bytes": size,
            }
            for model, level, dtype, count, tokens, size in one(
                "SELECT model, level, dtype, COUNT(*), SUM(tokens), SUM(bytes) FROM artifacts "
                "GROUP BY model, level, dtype ORDER BY model, level"
            )
        ]
        documents, passages, tokens = one(
            "SELECT COUNT(DISTINCT doc_key), COUNT(*), COALESCE(SUM(tokens), 0) FROM passages"
        ).fetchone()
        pending = one(
            "SELECT COUNT(*) FROM passages p WHERE NOT EXISTS "
            "(SELECT 1 FROM artifacts a WHERE a.token_sha256 = p.token_sha256)"
        ).fetchone()[0]
        return {
            "documents": documents,
            "passages": passages,
            "passage_tokens": tokens,
            "passages_without_cache": pending,
            "caches": caches,
        }


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up front,
    so two writers queue instead of deadlocking on a read-to-write upgrade."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
