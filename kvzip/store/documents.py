"""Documents in, passages out: reading text files, directories and JSONL, and splitting.

A passage is a run of the document's own token ids (one tokenization of the whole
document, cut at token boundaries), so the passages of a document concatenate
back to exactly its tokens, and a passage's cache is keyed by ids that no
re-tokenization can change.  Cuts prefer a paragraph break, then a sentence end,
in the second half of the window; only then do they fall at the token limit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvzip.errors import EmptyTextError, InputError

DEFAULT_PASSAGE_TOKENS = 512
_SNIFF_BYTES = 8192

# (token ids, character offsets [(start, end)] per token) of a text.
Tokenize = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


@dataclass(frozen=True)
class Document:
    """One text to pre-cache: ``key`` names it in the store (a path, or a JSONL ``id``)."""

    key: str
    source: str
    text: str


@dataclass(frozen=True)
class Passage:
    """A run of a document's tokens, the unit that is prefilled and stored."""

    doc_key: str
    source: str
    number: int  # 0-based position within its document
    text: str
    token_ids: tuple[int, ...]

    @property
    def token_sha256(self) -> str:
        return token_sha256(self.token_ids)


def token_sha256(token_ids: Sequence[int]) -> str:
    """The content address of a token sequence (ids as little-endian uint32)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<u4").tobytes()).hexdigest()


# ----------------------------------------------------------------------- reading
def read_documents(inputs: Sequence[str | Path]) -> list[Document]:
    """Every document named by ``inputs``: text files, directories (recursively) and ``.jsonl``.

    A file named explicitly must be UTF-8 text; inside a directory, hidden entries
    and files that are not UTF-8 text (binaries) are skipped.
    """
    if not inputs:
        raise InputError("no documents given")
    docs: list[Document] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in file.relative_to(path).parts):
                    continue
                docs.extend(_read_file(file, strict=False))
        elif path.is_file():
            found = list(_read_file(path, strict=True))
            if not found:
                raise EmptyTextError(f"{path} holds no text")
            docs.extend(found)
        else:
            raise InputError(f"document not found: {path}")
    if not docs:
        raise EmptyTextError(f"no text documents found in {', '.join(map(str, inputs))}")
    return docs


def _read_file(path: Path, *, strict: bool) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data[:_SNIFF_BYTES]:
        if strict:
            raise InputError(f"{path} is not a text file")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            raise InputError(f"{path} is not UTF-8 text (byte {exc.start} is invalid)") from None
        return
    key = str(path.resolve())
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(text, path)
    elif text.strip():
        yield Document(key, str(path), text)


def _jsonl_documents(text: str, path: Path) -> Iterator[Document]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("text"), str)
            or not isinstance(record.get("id"), (str, int))
            or isinstance(record.get("id"), bool)
        ):
            raise InputError(
                f'{path} line {number}: expected an object {{"id": ..., "text": "..."}}'
            )
        if record["text"].strip():
            yield Document(str(record["id"]), f"{path}:{number}", record["text"])


# --------------------------------------------------------------------- splitting
def split_document(doc: Document, tokenize: Tokenize, passage_tokens: int) -> list[Passage]:
    """Cut ``doc`` into passages of at most ``passage_tokens`` tokens (see the module doc)."""
    if passage_tokens < 1:
        raise InputError(f"--passage-tokens must be positive, got {passage_tokens}")
    ids, offsets = tokenize(doc.text)
    passages: list[Passage] = []
    start = 0
    while start < len(ids):
        end = _cut(doc.text, offsets, start, passage_tokens)
        text_end = offsets[end][0] if end < len(ids) else len(doc.text)
        text = doc.text[offsets[start][0] : text_end]
        if text.strip():
            passages.append(
                Passage(doc.key, doc.source, len(passages), text, tuple(ids[start:end]))
            )
        start = end
    return passages


def _cut(text: str, offsets: Sequence[tuple[int, int]], start: int, limit: int) -> int:
    """Where the passage starting at token ``start`` ends (exclusive)."""
    hard = start + limit
    if hard >= len(offsets):
        return len(offsets)
    best, best_score = hard, -1
    for cut in range(hard, start + max(1, limit // 2) - 1, -1):
        score = _boundary_score(text, offsets, cut)
        if score > best_score:
            best, best_score = cut, score
            if score == 3:
                break
    return best


def _boundary_score(text: str, offsets: Sequence[tuple[int, int]], cut: int) -> int:
    """3 paragraph break, 2 sentence end, 1 between characters, 0 inside a character.

    A cut falls between tokens ``cut - 1`` and ``cut``; byte-level tokens of one
    multi-byte character share an offset, and a cut between them scores 0.
    """
    begin = offsets[cut][0]
    if begin < offsets[cut - 1][1]:
        return 0
    before = text[:begin].rstrip(" \t")
    if before.endswith("\n\n") or (before.endswith("\n") and text[begin : begin + 1] == "\n"):
        return 3
    if before.endswith((".", "!", "?", "\n")):
        return 2
    return 1
