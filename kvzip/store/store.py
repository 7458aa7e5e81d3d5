"""A passage store: a directory holding ``index.sqlite`` plus the artifacts, wherever they live.

By default the artifacts sit in the store's own ``artifacts/`` folder, so the
directory can be moved or copied whole.  A store created with another artifact
URL (``s3://bucket/prefix``, ``memory://…``) remembers it in the index, and every
later command finds it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzip.errors import InputError, KvzipError
from kvzip.formats import BytesSource
from kvzip.levels import open_cache
from kvzip.store.artifacts import ArtifactStore
from kvzip.store.documents import token_sha256
from kvzip.store.index import ArtifactRecord, StoreIndex

INDEX_FILE = "index.sqlite"
ARTIFACTS_DIR = "artifacts"
# A file on storage with no index row may belong to a run that has written it and
# is about to record it; gc leaves such files alone until they are this old.
DEFAULT_GC_GRACE_S = 15 * 60

Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class PassageStore:
    """The index and the artifact location of one store, opened together."""

    def __init__(self, root: str | Path, *, artifacts: str | None = None, create: bool = False):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--store must be a directory: {self.root}")
        self.index = StoreIndex(self.root / INDEX_FILE, create=create)
        stored = self.index.meta("artifacts_url")
        if artifacts is not None and artifacts != stored:
            if stored is not None or self.index.artifact_names():
                raise InputError(
                    f"this store keeps its artifacts at {stored or self.root / ARTIFACTS_DIR}; "
                    "leave out --artifacts or pass that location"
                )
            self.index.set_meta("artifacts_url", artifacts)
            stored = artifacts
        self.artifacts = ArtifactStore(stored or str((self.root / ARTIFACTS_DIR).resolve()))

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        summary = self.index.summary()
        stored = sum(c["bytes"] for c in summary["caches"])
        return {
            "store": str(self.root),
            "index_bytes": (self.root / INDEX_FILE).stat().st_size,
            "artifacts_url": self.artifacts.url,
            **summary,
            "artifact_bytes": stored,
        }

    # ---------------------------------------------------------------- verify
    def verify(self, progress: Progress = _no_progress) -> StoreVerifyReport:
        """Check that every indexed artifact exists, decodes, and holds what its row says,
        and that the stored prompt openings decode."""
        records = self.index.artifacts()
        report = StoreVerifyReport(checked=len(records))
        for i, record in enumerate(records):
            for problem in self._artifact_problems(record):
                report.problems.append(f"{record.name}: {problem}")
            progress("verify", i + 1, len(records))
        report.problems += self._opening_problems()
        stored = {f.name for f in self.artifacts.listing() if not f.temporary}
        report.unindexed = len(stored - {r.name for r in records})
        report.unreferenced = len(self.index.unreferenced_artifacts())
        return report

    def _opening_problems(self) -> list[str]:
        """What is wrong with the store's prompt-opening caches."""
        problems = []
        for name in self.index.opening_names():
            try:
                with open_cache(BytesSource(self.index.opening(name) or b"")) as cache:
                    problems += [f"opening {name}: {p.message}" for p in cache.verify(decode=True)]
            except KvzipError as exc:
                problems.append(f"opening {name}: {exc}")
        return problems

    def _artifact_problems(self, record: ArtifactRecord) -> list[str]:
        try:
            with self.artifacts.open(record.name) as reader:
                problems = [p.message for p in reader.verify(decode=True)]
                header = reader.header
                if header.model_fingerprint != record.model:
                    problems.append("written by another model than the index says")
                if record.level not in header.level_names:
                    problems.append(f"has no level {record.level!r}")
                if token_sha256(reader.token_ids().tolist()) != record.token_sha256:
                    problems.append("holds other token ids than the index says")
                return problems
        except KvzipError as exc:
            return [str(exc)]

    # -------------------------------------------------------------------- gc
    def gc(self, *, grace_seconds: float = DEFAULT_GC_GRACE_S, dry_run: bool = False) -> GcReport:
        """Remove what nothing needs: index rows of missing artifacts, artifacts no passage
        holds, and files no row names or temporaries (once older than ``grace_seconds``:
        a running pre-cache writes a file just before it records it)."""
        files = self.artifacts.listing()
        on_storage = {f.name for f in files if not f.temporary}
        indexed = self.index.artifact_names()

        def expired(age: float | None) -> bool:
            return grace_seconds <= 0 or (age is not None and age >= grace_seconds)

        report = GcReport(
            dangling_rows=sorted(indexed - on_storage),
            unreferenced=sorted(set(self.index.unreferenced_artifacts()) & on_storage),
            orphan_files=sorted(
                f.name for f in files
                if not f.temporary and f.name not in indexed and expired(f.age)
            ),
            temporaries=sorted(f.name for f in files if f.temporary and expired(f.age)),
        )
        doomed = report.unreferenced + report.orphan_files + report.temporaries
        report.freed_bytes = sum(self._size_or_zero(name) for name in doomed)
        if not dry_run:
            self.index.remove_artifacts(report.dangling_rows + report.unreferenced)
            for name in doomed:
                self.artifacts.remove(name)
        return report

    def _size_or_zero(self, name: str) -> int:
        try:
            return self.artifacts.size(name)
        except FileNotFoundError:
            return 0


@dataclass
class StoreVerifyReport:
    checked: int
    problems: list[str] = field(default_factory=list)
    unindexed: int = 0  # files on storage no row names (gc removes them)
    unreferenced: int = 0  # artifacts no passage holds any more (gc removes them)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    dangling_rows: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    freed_bytes: int = 0
