"""Calibration profiles over HTTP: served beside the .kvz files, fetched and checked by clients.

The server and the client share this process, so each client test gets its own
empty ``KVZIP_PROFILE_DIR`` and an empty in-process profile cache: the client is
a machine that has never seen the profile.  The server is given its profile
directory explicitly (``create_app(..., profile_dirs=...)``), as it fixes it at start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TEXT
from test_stream_helpers import get, nginx_serving
from typer.testing import CliRunner

import kvzip.levels.profiles as profile_mod
from kvzip.cli.app import app
from kvzip.codecs.profile import PROFILE_SUFFIX, profile_from_bytes, profile_to_bytes
from kvzip.errors import FetchError, ProfileError, ProfileMismatchError, ProfileNotFoundError
from kvzip.levels import load_kv, open_cache, write_kvz
from kvzip.stream.client import stream_generate
from kvzip.stream.fetch import fetch
from kvzip.stream.http import RetryPolicy
from kvzip.stream.profiles import ProfileRef, download_profile
from kvzip.stream.server import create_app, serve_in_thread

FAST = RetryPolicy(attempts=2, base_delay=0.0)
SECRET = b"SECRET-OUTSIDE-THE-ROOT"
LEVELS = ["lossless", "balanced"]
DOC = TEXT + TEXT[:120]


def make_profile(km, seed: int) -> bytes:
    """A valid profile for ``km`` without calibrating: random orthonormal bases, random means."""
    rng = np.random.default_rng(seed)
    layers, heads, dim = km.num_layers, km.kv_heads, km.head_dim
    q = np.linalg.qr(rng.standard_normal((2, layers, heads, dim, dim)))[0].astype(np.float32)
    tensors = {
        "key_mean": rng.standard_normal((layers, heads, dim)).astype(np.float32) * 0.1,
        "value_mean": rng.standard_normal((layers, heads, dim)).astype(np.float32) * 0.1,
        "key_fwd": q[0], "key_inv": np.ascontiguousarray(q[0].swapaxes(-1, -2)),
        "value_fwd": q[1], "value_inv": np.ascontiguousarray(q[1].swapaxes(-1, -2)),
        "step_scale": (1 + rng.random((2, layers))).astype(np.float32),
    }
    return profile_to_bytes(tensors, {"model_fingerprint": km.identity()["fingerprint"]})


def name_of(digest: str) -> str:
    return digest + PROFILE_SUFFIX


@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    """A root with a calibrated a.kvz whose profile lives in the server's profile directory,
    a second valid profile no served file names, a secret outside the root, and the answer."""
    top = tmp_path_factory.mktemp("profiles")
    root, server_dir = top / "root", top / "server-profiles"
    (root / "sub").mkdir(parents=True)
    server_dir.mkdir()
    data, other = make_profile(tiny_llama, 1), make_profile(tiny_llama, 2)
    digest, other_digest = hashlib.sha256(data).hexdigest(), hashlib.sha256(other).hexdigest()
    (server_dir / name_of(digest)).write_bytes(data)
    (server_dir / name_of(other_digest)).write_bytes(other)
    (top / "secret.kvz").write_bytes(SECRET)
    (top / name_of(other_digest)).write_bytes(other)
    os.symlink(top, root / "dir-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVZIP_PROFILE_DIR", str(server_dir))
        mp.setattr(profile_mod, "_LOADED", {})
        ids = tiny_llama.document_ids(DOC, None)
        write_kvz(tiny_llama.prefill(ids).dense, ids, root / "a.kvz", tiny_llama, levels=LEVELS,
                  chunk_tokens=64, dtype="float32", profile=profile_from_bytes(data))
        kv = load_kv(root / "a.kvz", "balanced", decoders=1).kv.dense
        expected = tiny_llama.generate(ids + tiny_llama.prompt_ids("Q", None), kv=kv,
                                       max_new_tokens=4)
    with open_cache(root / "a.kvz") as reader:
        assert reader.header.levels[1].codec["id"] == "kvzip-profile"
    return {"top": top, "root": root, "server_dir": server_dir, "data": data, "digest": digest,
            "other_digest": other_digest, "expected": expected}


@pytest.fixture(scope="module")
def served(world):
    with serve_in_thread(create_app(world["root"], profile_dirs=[world["server_dir"]])) as url:
        yield url


@pytest.fixture
def bare_client(monkeypatch, tmp_path) -> Path:
    """This process as a client machine that has no profile: an empty profile directory."""
    directory = tmp_path / "client-profiles"
    monkeypatch.setenv("KVZIP_PROFILE_DIR", str(directory))
    monkeypatch.setattr(profile_mod, "_LOADED", {})
    return directory


# ------------------------------------------------------------------------- server
def test_manifest_and_listing_name_the_profile(world, served):
    digest = world["digest"]
    manifest = httpx.get(served + "/contexts/a.kvz/manifest").json()
    assert manifest["profiles"] == [{"digest": digest, "bytes": len(world["data"]),
                                     "url": f"/profiles/{name_of(digest)}"}]
    listing = httpx.get(served + "/contexts").json()["contexts"]
    assert listing[0]["profiles"] == [digest]


def test_profile_route_serves_bytes_with_etag_and_ranges(world, served):
    digest, data = world["digest"], world["data"]
    for path in (f"/profiles/{name_of(digest)}", f"/{name_of(digest)}", f"/sub/{name_of(digest)}"):
        whole = httpx.get(served + path)
        assert whole.status_code == 200 and whole.content == data, path
        assert whole.headers["etag"] == f'"{digest}"'
    url = served + f"/profiles/{name_of(digest)}"
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert httpx.get(url, headers={"If-None-Match": f'"{digest}"'}).status_code == 304
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416


@pytest.mark.parametrize(
    "target",
    [
        "/profiles/../secret.kvz", "/profiles/%2e%2e/secret.kvz", "/profiles/..%2fsecret.kvz",
        "/profiles/..%2f..%2fsecret.kvz", "/profiles/..%5csecret.kvz", "/profiles/%2e%2e%2fsecret.kvz",
        "/profiles/%252e%252e%252fsecret.kvz", "/profiles//secret.kvz", "/profiles/secret.kvz%00",
        "/profiles/", "/profiles/abc.kvzprofile", "/profiles/.hidden.kvzprofile",
        "/profiles/" + "0" * 64 + ".kvzprofile",  # well formed, unknown
        "/profiles/{other}.kvzprofile",  # in the server's profile dir, named by no served file
        "/profiles/{upper}.kvzprofile", "/profiles/{digest}.kvzprofile/x",
        "/profiles/{digest}.kvzprofile%00", "/profiles/../{digest}.kvzprofile",
        "/dir-out/{other}.kvzprofile",  # a symlinked directory that leaves the root
        "/nowhere/{digest}.kvzprofile",  # no such directory under the root
        "/sub/../{digest}.kvzprofile", "/sub/%2e%2e/%2e%2e/{other}.kvzprofile",
    ],
)
def test_traversal_and_unknown_digests_via_profiles_get_4xx(world, served, target):
    target = target.format(digest=world["digest"], other=world["other_digest"],
                           upper=world["digest"].upper())
    status, response = get(served, target)
    assert 400 <= status < 500, (target, response[:200])
    assert SECRET not in response and world["data"][:64] not in response


# ------------------------------------------------------------------------- client
def test_stream_generate_fetches_a_missing_profile_and_decodes_right(world, served, bare_client,
                                                                     tiny_llama):
    digest = world["digest"]
    result = stream_generate(served + "/contexts/a.kvz/manifest", "Q", tiny_llama,
                             levels=["balanced"], max_new_tokens=4)
    assert result.new_token_ids == world["expected"]
    assert result.levels == ["balanced"] * len(result.chunks)
    assert [(p.digest, p.fetched) for p in result.profiles] == [(digest, True)]
    assert (bare_client / name_of(digest)).read_bytes() == world["data"]
    again = stream_generate(served + "/a.kvz", "Q", tiny_llama, levels=["balanced"],
                            max_new_tokens=4)  # the plain-file path; now found locally
    assert again.new_token_ids == world["expected"]
    assert [(p.digest, p.fetched) for p in again.profiles] == [(digest, False)]


def test_lossless_only_needs_no_profile(served, bare_client, tiny_llama):
    result = stream_generate(served + "/contexts/a.kvz/manifest", "Q", tiny_llama,
                             levels=["lossless"], max_new_tokens=1)
    assert result.profiles == [] and not bare_client.exists()


def test_generate_url_from_a_plain_file_url_fetches_the_profile(world, served, bare_client,
                                                                 tiny_llama, tiny_model_dir):
    result = CliRunner().invoke(app, ["generate", served + "/a.kvz", "--prompt", "Q", "-n", "4",
                                      "--model", str(tiny_model_dir), "--level", "balanced", "-q"])
    assert result.exit_code == 0, result.output
    assert f"fetched calibration profile {world['digest'][:12]}" in result.stderr
    assert (bare_client / name_of(world["digest"])).is_file()


def test_fetch_command_fetches_the_profile_and_says_so(world, served, bare_client, tmp_path):
    out = tmp_path / "x.kvz"
    result = CliRunner().invoke(app, ["fetch", served + "/a.kvz", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert f"fetched calibration profile {world['digest'][:12]}" in result.stderr
    assert "SHA-256 verified" in result.stderr
    assert out.read_bytes() == (world["root"] / "a.kvz").read_bytes()
    assert (bare_client / name_of(world["digest"])).read_bytes() == world["data"]
    with open_cache(out) as reader:  # decodable here now
        assert not reader.verify(decode=True)
    second = CliRunner().invoke(app, ["fetch", served + "/a.kvz", "-o", str(out), "-q", "--json"])
    assert second.exit_code == 0, second.output
    assert '"fetched": false' in second.stdout


def test_without_the_profile_on_the_server_the_client_says_so(world, bare_client, tmp_path,
                                                              tiny_llama):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(world["root"] / "a.kvz", root / "a.kvz")
    with serve_in_thread(create_app(root, profile_dirs=[tmp_path / "none"])) as url:
        with pytest.raises(FetchError) as info:
            fetch(url + "/a.kvz", tmp_path / "x.kvz", policy=FAST)
        lossless = stream_generate(url + "/a.kvz", "Q", tiny_llama, levels=["lossless"],
                                   max_new_tokens=1)
    message = str(info.value)
    assert "HTTP 404" in message and world["digest"][:12] in message and "\n" not in message
    assert not (tmp_path / "x.kvz").exists() and not bare_client.exists()
    assert lossless.levels[0] == "lossless"
    with pytest.raises(ProfileNotFoundError):  # and decoding the file here is a clear error
        load_kv(world["root"] / "a.kvz", "balanced", decoders=1)


def test_a_tampered_profile_on_the_server_is_refused(world, bare_client, tmp_path, tiny_llama):
    """A damaged copy in the root is never served (the server checks the hash), and when a
    server hands out wrong bytes anyway the client refuses them and stores nothing."""
    digest, data = world["digest"], world["data"]
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(world["root"] / "a.kvz", root / "a.kvz")
    profile = root / name_of(digest)
    profile.write_bytes(data)
    with serve_in_thread(create_app(root, profile_dirs=[tmp_path / "none"])) as url:
        assert httpx.get(f"{url}/profiles/{name_of(digest)}").content == data  # checked, cached
        # Tamper in place, same size and mtime: the server's cached check is now stale.
        st = profile.stat()
        with open(profile, "r+b") as f:
            f.seek(len(data) - 5)
            f.write(bytes(b ^ 0xFF for b in data[-5:]))
        os.utime(profile, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(ProfileMismatchError) as info:
            stream_generate(url + "/contexts/a.kvz/manifest", "Q", tiny_llama, levels=["balanced"],
                            max_new_tokens=1, policy=FAST)
        message = str(info.value)
        assert "hash to" in message and "refused" in message and "\n" not in message
        assert not bare_client.exists()
        # A fresh server checks the damaged file and will not serve it at all.
        os.utime(profile)  # a new identity
        assert httpx.get(f"{url}/profiles/{name_of(digest)}").status_code == 404
        result = CliRunner().invoke(app, ["fetch", url + "/a.kvz", "-o", str(tmp_path / "y.kvz"),
                                          "-q"])
    assert result.exit_code == 5
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HTTP 404" in lines[0]
    assert not (tmp_path / "y.kvz").exists() and not bare_client.exists()


def test_a_plain_static_server_serves_the_profile_beside_the_file(world, bare_client, tmp_path,
                                                                  tiny_llama):
    """nginx: the profile at <same dir>/<digest>.kvzprofile; a tampered one is refused."""
    digest = world["digest"]
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(world["root"] / "a.kvz", root / "a.kvz")
    bad = bytearray(world["data"])
    bad[-1] ^= 0xFF
    (root / name_of(digest)).write_bytes(bytes(bad))
    with nginx_serving(root, tmp_path) as url:
        with pytest.raises(ProfileMismatchError, match="hash to .* refused"):
            fetch(url + "/a.kvz", tmp_path / "x.kvz", policy=FAST)
        assert not (tmp_path / "x.kvz").exists() and not bare_client.exists()
        (root / name_of(digest)).write_bytes(world["data"])
        summary = fetch(url + "/a.kvz", tmp_path / "x.kvz", policy=FAST)
        assert [(p.digest, p.fetched) for p in summary.profiles] == [(digest, True)]
        result = stream_generate(url + "/a.kvz", "Q", tiny_llama, levels=["balanced"],
                                 max_new_tokens=4)
    assert result.new_token_ids == world["expected"]


# --------------------------------------------------------- a lying server, unit level
def _server(handler):
    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("answer", "size", "error", "message"),
    [
        (lambda d: httpx.Response(404), None, FetchError, "HTTP 404"),
        (lambda d: httpx.Response(200, content=d[:-1] + bytes([d[-1] ^ 1])), None,
         ProfileMismatchError, "hash to"),
        (lambda d: httpx.Response(200, headers={"content-length": str(len(d))},
                                  stream=httpx.ByteStream(d[:-100])), None, FetchError,
         "truncated body"),
        (lambda d: httpx.Response(200, stream=httpx.ByteStream(d[:-100])), "known", FetchError,
         "truncated body"),
        (lambda d: httpx.Response(200, content=d + b"x"), "known", FetchError, "expected"),
        (lambda d: httpx.Response(200, stream=httpx.ByteStream(d),
                                  headers={"content-encoding": "gzip"}), None,
         FetchError, "gzip-encoded"),
        (lambda d: httpx.Response(200, content=b"not a profile"), "junk", ProfileError,
         "not a readable profile"),
    ],
)
def test_a_lying_profile_server_is_a_one_line_error(world, answer, size, error, message):
    data = world["data"]
    digest = world["digest"]
    if size == "junk":  # bytes that do hash to the digest asked for, but are no profile
        data, digest = b"not a profile", hashlib.sha256(b"not a profile").hexdigest()
    ref = ProfileRef(digest, "http://test/p.kvzprofile", len(data) if size == "known" else None)
    with pytest.raises(error) as info:
        download_profile(ref, _server(lambda request: answer(data)), FAST)
    assert message in str(info.value) and "\n" not in str(info.value)
