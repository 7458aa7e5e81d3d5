"""A context's manifest: what a streaming client needs to plan before fetching any KV.

The server builds it from a ``.kvz``'s header and index (:func:`build_manifest`);
the client reads it back into a :class:`ContextManifest` (:func:`parse_manifest`),
or builds the same object straight from a ``.kvz`` URL on any static server
(:func:`manifest_from_reader`), so the client code after this point does not care
which kind of server it talks to.  A parsed manifest passes the container's own
index validation, so a lying server cannot point the client outside the file.

Manifest JSON (``manifest_version`` 1)::

    {"manifest_version": 1, "name": "docs/a.kvz", "model_fingerprint": "...",
     "file": {"url": "/docs/a.kvz", "size": 123456, "etag": "\\"...\\"", "data_offset": 912},
     "header": {...the file's header...},
     "token_ids_payload": {"offset": 912, "length": 300, "crc32": 305419896},
     "profiles": [{"digest": "<64 hex>", "bytes": 3145728,
                   "url": "/profiles/<64 hex>.kvzprofile"}],
     "chunks": [{"chunk": 0, "token_start": 0, "token_count": 256,
                 "token_ids": [...], "text": "...",
                 "levels": {"lossless": {"offset": ..., "length": ..., "crc32": ...,
                                         "url": "/contexts/docs/a.kvz/chunks/0/lossless"}}}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kvzip.errors import FetchError, KvzipError
from kvzip.formats import EntryKind, IndexEntry, KvzHeader, KvzReader, validate
from kvzip.levels import is_digest
from kvzip.stream.profiles import ProfileRef, plain_profile_ref, profile_url

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk: its tokens, its payload per level, and (from kvzip's server) its text."""

    chunk: int
    token_start: int
    token_ids: tuple[int, ...]
    payloads: dict[str, IndexEntry]  # level name -> where its bytes lie in the file
    text: str | None = None

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def sizes(self) -> dict[str, int]:
        return {name: entry.length for name, entry in self.payloads.items()}


@dataclass(frozen=True)
class ContextManifest:
    header: KvzHeader
    file_url: str  # absolute
    file_size: int
    etag: str | None
    chunks: tuple[ChunkInfo, ...]
    profiles: tuple[ProfileRef, ...] = ()  # every calibration profile the file's codecs name

    @property
    def token_ids(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.token_ids]

    def profiles_for(self, levels: Sequence[str]) -> list[ProfileRef]:
        """The profiles needed to decode ``levels``."""
        wanted = self.header.profile_digests(levels)
        return [ref for ref in self.profiles if ref.digest in wanted]


def chunk_url(name: str, chunk: int, level: str) -> str:
    """Server path of one chunk payload (names and levels are percent-encoded)."""
    return f"/contexts/{quote(name)}/chunks/{chunk}/{quote(level, safe='')}"


def manifest_url(name: str) -> str:
    return f"/contexts/{quote(name)}/manifest"


def build_manifest(reader: KvzReader, name: str, etag: str) -> dict[str, Any]:
    """The manifest JSON of the ``.kvz`` open in ``reader``, served as ``/<name>``."""
    header = reader.header
    ids = reader.token_ids().tolist()
    texts = reader.chunk_texts()
    per_level = [reader.kv_entries(level) for level in header.level_names]
    token_entry = next(e for e in reader.entries if e.kind is EntryKind.TOKEN_IDS)
    chunks = []
    for number, first in enumerate(per_level[0]):
        start, end = first.token_range
        chunks.append(
            {
                "chunk": number,
                "token_start": start,
                "token_count": first.token_count,
                "token_ids": ids[start:end],
                "text": None if texts is None else texts[number],
                # which layers hold positions in this chunk (a sliding layer only its window)
                "layers": header.layout.chunk_layers(start, end) if not header.is_dense
                else list(range(header.num_layers)),
                "levels": {
                    level: {**_location(entries[number]), "url": chunk_url(name, number, level)}
                    for level, entries in zip(header.level_names, per_level, strict=True)
                },
            }
        )
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "model_fingerprint": header.model_fingerprint,
        "file": {
            "url": "/" + quote(name),
            "size": reader.source.size(),
            "etag": etag,
            "data_offset": reader.preamble.data_offset,
        },
        "header": header.raw,
        "token_ids_payload": _location(token_entry),
        "profiles": [
            {"digest": d, "bytes": header.profile_bytes(d), "url": profile_url(d)}
            for d in header.profile_digests()
        ],
        "chunks": chunks,
    }


def _location(entry: IndexEntry) -> dict[str, int]:
    return {"offset": entry.offset, "length": entry.length, "crc32": entry.crc32}


def parse_manifest(data: Any, url: str) -> ContextManifest:
    """Check a manifest fetched from ``url`` and resolve its links; :class:`FetchError` if bad."""
    try:
        return _parse_manifest(data, url)
    except FetchError:
        raise
    except KvzipError as exc:  # the header or index rules, applied to what the server claims
        raise FetchError(f"{url}: manifest describes an invalid .kvz: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FetchError(f"{url}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _parse_manifest(data: Any, url: str) -> ContextManifest:
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise FetchError(f"{url}: unsupported manifest version {data.get('manifest_version')!r}")
    header = KvzHeader(data["header"])
    file = data["file"]
    size, data_offset = _int(file["size"]), _int(file["data_offset"])
    names = header.level_names
    entries = [_entry(EntryKind.TOKEN_IDS, 0, 0, 0, header.token_count, data["token_ids_payload"])]
    chunks = []
    for item in data["chunks"]:
        number, start = _int(item["chunk"]), _int(item["token_start"])
        count = _int(item["token_count"])
        ids = tuple(_int(t) for t in item["token_ids"])
        if len(ids) != count:
            raise FetchError(f"{url}: chunk {number} lists {len(ids)} token ids for {count} tokens")
        if set(item["levels"]) != set(names):
            raise FetchError(f"{url}: chunk {number} does not list exactly the file's levels")
        payloads = {
            name: _entry(EntryKind.KV, names.index(name), number, start, count, item["levels"][name])
            for name in names
        }
        entries.extend(payloads.values())
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise FetchError(f"{url}: chunk {number} text is not a string")
        chunks.append(ChunkInfo(number, start, ids, payloads, text))
    validate(header, entries, size, data_offset)  # tiling, bounds, overlaps: the format's rules
    etag = file.get("etag")
    file_url = str(httpx.URL(url).join(file["url"]))
    return ContextManifest(
        header=header,
        file_url=file_url,
        file_size=size,
        etag=etag if isinstance(etag, str) else None,
        chunks=tuple(sorted(chunks, key=lambda c: c.chunk)),
        profiles=_profile_refs(data.get("profiles"), header, url, file_url),
    )


def _profile_refs(listed: Any, header: KvzHeader, url: str, file_url: str) -> tuple[ProfileRef, ...]:
    """The profiles the header names, each where the manifest says (else beside the file)."""
    given: dict[str, ProfileRef] = {}
    for item in listed or []:
        digest, size = item["digest"], item.get("bytes")
        if not is_digest(digest):
            raise FetchError(f"{url}: manifest names a profile by {str(digest)[:80]!r}, not a digest")
        if size is not None:
            size = _int(size)
        given[digest] = ProfileRef(digest, str(httpx.URL(url).join(str(item["url"]))), size)
    return tuple(given.get(d) or plain_profile_ref(file_url, header, d) for d in header.profile_digests())


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r:.40}")
    return value


def _entry(kind: EntryKind, level: int, chunk: int, start: int, count: int, loc: Any) -> IndexEntry:
    return IndexEntry(
        kind, level, chunk, start, count, _int(loc["offset"]), _int(loc["length"]), _int(loc["crc32"])
    )


def manifest_from_reader(reader: KvzReader, url: str, etag: str | None) -> ContextManifest:
    """The manifest of a ``.kvz`` opened directly (over Range requests on any server).

    Chunk texts are left out: the client recomputes from token ids, and fetching
    every text would cost one request per chunk.
    """
    header = reader.header
    ids = reader.token_ids().tolist()
    per_level = {level: reader.kv_entries(level) for level in header.level_names}
    first = per_level[header.level_names[0]]
    chunks = tuple(
        ChunkInfo(
            chunk=entry.chunk,
            token_start=entry.token_start,
            token_ids=tuple(ids[entry.token_start : entry.token_start + entry.token_count]),
            payloads={level: entries[i] for level, entries in per_level.items()},
        )
        for i, entry in enumerate(first)
    )
    profiles = tuple(plain_profile_ref(url, header, d) for d in header.profile_digests())
    return ContextManifest(header, url, reader.source.size(), etag, chunks, profiles)
