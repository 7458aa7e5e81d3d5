"""The OpenAPI 3.1 description of ``kvzip serve-chunks``, written by hand.

Hand-written because the server has six read-only routes and the interesting
parts (Range, ETag, 206/304/416) are headers a generator would not describe;
``tests/test_stream_server.py`` checks that every route the app has is listed.
"""

from __future__ import annotations

from typing import Any

from kvzip import __version__

_ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
        }
    },
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Path of the .kvz under the served root, e.g. docs/a.kvz",
    "schema": {"type": "string"},
}
_PAYLOAD = {
    "type": "object",
    "required": ["offset", "length", "crc32"],
    "properties": {
        "offset": {"type": "integer", "description": "byte offset in the .kvz"},
        "length": {"type": "integer"},
        "crc32": {"type": "integer", "description": "zlib CRC-32 of the payload"},
        "url": {"type": "string", "description": "path of the chunk endpoint"},
    },
}
_MANIFEST = {
    "type": "object",
    "required": ["manifest_version", "name", "model_fingerprint", "file", "header", "chunks"],
    "properties": {
        "manifest_version": {"const": 1},
        "name": {"type": "string"},
        "model_fingerprint": {"type": "string"},
        "file": {
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "size": {"type": "integer"},
                "etag": {"type": "string"},
                "data_offset": {"type": "integer"},
            },
        },
        "header": {"type": "object", "description": "the .kvz header (docs/format.md)"},
        "token_ids_payload": _PAYLOAD,
        "profiles": {
            "type": "array",
            "description": "the calibration profiles the file's codecs name; a client that "
            "lacks one fetches it from its url and checks that its SHA-256 is the digest",
            "items": {
                "type": "object",
                "required": ["digest", "url"],
                "properties": {
                    "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                               "description": "SHA-256 of the profile file"},
                    "bytes": {"type": ["integer", "null"], "description": "its size, if known"},
                    "url": {"type": "string", "description": "/profiles/{digest}.kvzprofile"},
                },
            },
        },
        "chunks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "chunk": {"type": "integer"},
                    "token_start": {"type": "integer"},
                    "token_count": {"type": "integer"},
                    "token_ids": {"type": "array", "items": {"type": "integer"}},
                    "text": {"type": ["string", "null"]},
                    "layers": {"type": "array", "items": {"type": "integer"},
                               "description": "the layers holding positions in this chunk"},
                    "levels": {"type": "object", "additionalProperties": _PAYLOAD},
                },
            },
        },
    },
}


def openapi_spec() -> dict[str, Any]:
    errors = {"400": _ERROR, "404": _ERROR}
    octets = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvzip serve-chunks",
            "version": __version__,
            "description": "Read-only access to the .kvz files under one directory: a listing, "
            "per-context manifests, single chunk payloads, each whole file with byte ranges, "
            "and the calibration profiles the files name.",
        },
        "paths": {
            "/contexts": {
                "get": {
                    "summary": "List the contexts under the root",
                    "responses": {"200": {"description": "The contexts", "content": {
                        "application/json": {"schema": {"type": "object", "properties": {
                            "contexts": {"type": "array", "items": {"type": "object"}}}}}}}},
                }
            },
            "/contexts/{name}/manifest": {
                "get": {
                    "summary": "A context's manifest: chunks, token ids, texts, payload sizes "
                    "and checksums per level",
                    "parameters": [_NAME],
                    "responses": {
                        "200": {"description": "The manifest",
                                "content": {"application/json": {"schema": _MANIFEST}}},
                        "422": _ERROR,
                        **errors,
                    },
                }
            },
            "/contexts/{name}/chunks/{chunk}/{level}": {
                "get": {
                    "summary": "One chunk's payload at one level",
                    "parameters": [
                        _NAME,
                        {"name": "chunk", "in": "path", "required": True,
                         "schema": {"type": "integer", "minimum": 0}},
                        {"name": "level", "in": "path", "required": True,
                         "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "The payload; header X-Kvzip-Crc32 holds its "
                                "CRC-32 in hex", "content": octets},
                        "422": _ERROR,
                        **errors,
                    },
                }
            },
            "/{name}": {
                "get": {
                    "summary": "The whole .kvz file, with single byte ranges (RFC 9110)",
                    "parameters": [
                        _NAME,
                        {"name": "Range", "in": "header", "schema": {"type": "string"},
                         "description": "bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX; one range"},
                        {"name": "If-Range", "in": "header", "schema": {"type": "string"}},
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "The whole file (strong ETag)", "content": octets},
                        "206": {"description": "One range, with Content-Range", "content": octets},
                        "304": {"description": "Not modified (If-None-Match matched)"},
                        "416": {"description": "Range not satisfiable; Content-Range: bytes */SIZE"},
                        **errors,
                    },
                }
            },
            "/profiles/{digest}.kvzprofile": {
                "get": {
                    "summary": "A calibration profile (safetensors) that a served .kvz names, "
                    "with single byte ranges; also served as /{dir}/{digest}.kvzprofile beside "
                    "the files, as a static server would",
                    "parameters": [
                        {"name": "digest", "in": "path", "required": True,
                         "description": "SHA-256 of the profile file, 64 lowercase hex digits",
                         "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                        {"name": "Range", "in": "header", "schema": {"type": "string"}},
                        {"name": "If-Range", "in": "header", "schema": {"type": "string"}},
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "The profile; its ETag is the quoted digest and "
                                "it is cacheable forever (content-addressed)", "content": octets},
                        "206": {"description": "One range, with Content-Range", "content": octets},
                        "304": {"description": "Not modified (If-None-Match matched)"},
                        "416": {"description": "Range not satisfiable"},
                        **errors,
                    },
                }
            },
            "/openapi.json": {
                "get": {"summary": "This description",
                        "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}
            },
        },
    }
