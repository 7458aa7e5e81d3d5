"""The streaming client: a distrustful range source, fetch, and adaptive stream_generate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import TEXT
from test_stream_helpers import nginx_serving, write_context
from typer.testing import CliRunner

from kvzip.cli.app import app
from kvzip.errors import FetchError
from kvzip.formats import open_kvz
from kvzip.stream.client import RECOMPUTE, stream_generate
from kvzip.stream.fetch import fetch
from kvzip.stream.http import HttpRangeSource, RetryPolicy, get_json
from kvzip.stream.manifest import parse_manifest
from kvzip.stream.ranges import parse_range
from kvzip.stream.server import Throttle, create_app, serve_in_thread

FAST = RetryPolicy(attempts=3, base_delay=0.0)
DATA = bytes(range(256)) * 400  # larger than the first read, so a second request follows
ETAG = '"v1"'


def range_server(data: bytes = DATA, misbehave=None, calls: list | None = None):
    """An httpx client whose transport serves ``data`` with ranges; ``misbehave`` bends answers.

    ``misbehave(n, request, response_kwargs)`` gets the call number and the
    honest answer's keyword arguments and may change or replace them.
    """

    calls = [] if calls is None else calls

    def handler(request: httpx.Request) -> httpx.Response:
        n = len(calls)
        calls.append(request)
        r = parse_range(request.headers["range"], len(data))
        kwargs = {
            "status_code": 206,
            "content": data[r.start:r.end],
            "headers": {"content-range": r.content_range(), "etag": ETAG},
        }
        if misbehave is not None:
            outcome = misbehave(n, request, kwargs)
            if isinstance(outcome, (httpx.Response, Exception)):
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
        # A stream, not content: httpx would otherwise decode the body before the client looks.
        content = kwargs.pop("content")
        return httpx.Response(**kwargs, stream=httpx.ByteStream(content))

    return httpx.Client(transport=httpx.MockTransport(handler))


def read_twice(client: httpx.Client) -> bytes:
    source = HttpRangeSource("http://test/a.kvz", client, policy=FAST)
    source.size()
    return source.get_bytes(70_000, 100)


def test_an_honest_server_is_read_exactly():
    calls: list = []
    source = HttpRangeSource("http://test/a.kvz", range_server(calls=calls), policy=FAST)
    assert source.size() == len(DATA)
    assert source.get_bytes(5, 10) == DATA[5:15]  # served from the first request
    assert len(calls) == 1
    assert source.get_bytes(0, len(DATA)) == DATA
    assert calls[-1].headers["if-range"] == ETAG
    assert all(c.headers["accept-encoding"] == "identity" for c in calls)


def _set(**changes):
    def misbehave(n, request, kwargs):
        if n >= 1:
            for key, value in changes.items():
                if key == "headers":
                    kwargs["headers"] = {**kwargs["headers"], **value}
                elif callable(value):
                    kwargs[key] = value(kwargs[key])
                else:
                    kwargs[key] = value
    return misbehave


@pytest.mark.parametrize(
    ("misbehave", "message"),
    [
        (_set(status_code=200, content=DATA), "answered 200"),
        (_set(headers={"etag": '"v2"'}), 'changed on the server (ETag "v1" became "v2")'),
        (_set(content=lambda c: c[:-7]), "truncated body: received 93 of 100 bytes"),
        (_set(headers={"content-range": f"bytes 0-99/{len(DATA)}"}), "server sent bytes 0-99"),
        (_set(headers={"content-range": "bytes junk"}), "malformed Content-Range"),
        (_set(headers={"content-range": f"bytes 70000-70099/{len(DATA) + 1}"}), "changed size"),
        (_set(content=lambda c: c + b"extra"), "more than the 100 bytes expected"),
        (_set(headers={"content-encoding": "gzip"}), "gzip-encoded body"),
        (_set(status_code=404, content=b""), "HTTP 404"),
        (_set(status_code=503), "server error HTTP 503 (gave up after 3 attempts)"),
        (lambda n, r, k: httpx.ConnectError("connection reset") if n >= 1 else None,
         "ConnectError: connection reset (gave up after 3 attempts)"),
    ],
)
def test_a_misbehaving_server_is_a_one_line_fetch_error(misbehave, message):
    with pytest.raises(FetchError) as info:
        read_twice(range_server(misbehave=misbehave))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_transient_failures_are_retried_with_backoff():
    calls: list = []

    def flaky(n, request, kwargs):
        if n == 1:
            return httpx.ReadError("connection reset by peer")
        if n == 2:
            kwargs["status_code"] = 502

    assert read_twice(range_server(misbehave=flaky, calls=calls)) == DATA[70_000:70_100]
    assert len(calls) == 4
    assert RetryPolicy(base_delay=0.2, max_delay=1.0).delay(5) == 1.0


def test_client_errors_are_not_retried():
    calls: list = []
    with pytest.raises(FetchError):
        read_twice(range_server(misbehave=_set(status_code=403, content=b""), calls=calls))
    assert len(calls) == 2


def test_json_fetches_refuse_junk():
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"{")))
    with pytest.raises(FetchError, match="not JSON"):
        get_json(client, "http://test/m", FAST)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(manifest_version=7), "unsupported manifest version 7"),
        (lambda m: m["chunks"][0]["levels"]["lossless"].update(offset=10**9), "invalid .kvz"),
        (lambda m: m["chunks"][1]["levels"]["lossless"].update(
            offset=m["chunks"][0]["levels"]["lossless"]["offset"]), "overlaps"),
        (lambda m: m["chunks"][0]["token_ids"].pop(), "token ids"),
        (lambda m: m["chunks"][0]["levels"].pop("lossless"), "exactly the file's levels"),
        (lambda m: m["header"].pop("num_layers"), "num_layers"),
        (lambda m: m.update(chunks="nope"), "malformed manifest"),
    ],
)
def test_a_lying_manifest_is_refused(served, edit, message):
    url = served[0] + "/contexts/a.kvz/manifest"
    manifest = httpx.get(url).json()
    edit(manifest)
    with pytest.raises(FetchError, match=message):
        parse_manifest(manifest, url)


# ----------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def context_dir(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ctx")
    write_context(tiny_llama, root / "a.kvz", TEXT + TEXT[:120])
    return root


@pytest.fixture(scope="module")
def served(context_dir):
    with serve_in_thread(create_app(context_dir)) as url:
        yield url, context_dir


def test_fetch_downloads_and_verifies(served, tmp_path):
    url, root = served
    summary = fetch(url + "/a.kvz", tmp_path / "x.kvz")
    assert (tmp_path / "x.kvz").read_bytes() == (root / "a.kvz").read_bytes()
    assert summary.payloads_verified > 6 and summary.etag
    assert os.listdir(tmp_path) == ["x.kvz"]


def test_fetch_refuses_corrupt_payloads_and_leaves_nothing(context_dir, tmp_path):
    data = bytearray((context_dir / "a.kvz").read_bytes())
    data[-100] ^= 0xFF  # inside the last payload: the index and header still check out
    client = range_server(bytes(data))
    with pytest.raises(FetchError, match="downloaded file is corrupt: .*checksum mismatch"):
        fetch("http://test/a.kvz", tmp_path / "x.kvz", client=client, policy=FAST)
    assert os.listdir(tmp_path) == []


def test_fetch_command(served, tmp_path):
    runner = CliRunner()
    out = tmp_path / "y.kvz"
    result = runner.invoke(app, ["fetch", served[0] + "/a.kvz", "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes"] == out.stat().st_size
    missing = runner.invoke(app, ["fetch", served[0] + "/nope.kvz", "-o", str(out), "-q"])
    assert missing.exit_code == 5
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HTTP 404" in lines[0]


# ------------------------------------------------------------------ stream_generate


def local_tokens(km, n: int = 4) -> list[int]:
    ids = km.document_ids(TEXT + TEXT[:120], None)
    return km.generate(ids + km.prompt_ids("Q", None), max_new_tokens=n)


@pytest.mark.parametrize("path", ["/contexts/a.kvz/manifest", "/a.kvz"])
def test_stream_generate_matches_local_generation(served, tiny_llama, path):
    result = stream_generate(served[0] + path, "Q", tiny_llama, levels=["lossless"],
                             max_new_tokens=4)
    assert result.new_token_ids == local_tokens(tiny_llama)
    assert result.levels == ["lossless"] * 6 and result.deadline_met is None
    assert result.first_token_seconds >= result.context_ready_seconds > 0


def test_chunks_are_decoded_side_by_side_with_the_same_result(served, tiny_llama, monkeypatch):
    """Two decoders work on two chunks at once (each first decode waits for the other
    to start), and the answer is the one a single decoder gives."""
    import threading

    from kvzip.levels import LevelCodecs

    url = served[0] + "/contexts/a.kvz/manifest"
    one = stream_generate(url, "Q", tiny_llama, levels=["balanced"], max_new_tokens=4, decoders=1)
    real, seen = LevelCodecs.decode, set()
    both = threading.Barrier(2, timeout=30)

    def decode(self, entry, payload):
        if threading.get_ident() not in seen:
            seen.add(threading.get_ident())
            both.wait()
        return real(self, entry, payload)

    monkeypatch.setattr(LevelCodecs, "decode", decode)
    two = stream_generate(url, "Q", tiny_llama, levels=["balanced"], max_new_tokens=4, decoders=2)
    assert len(seen) == 2
    assert two.new_token_ids == one.new_token_ids and two.levels == one.levels == ["balanced"] * 6
    assert [c.chunk for c in two.chunks] == list(range(6))


def test_generate_command_streams_a_url(served, tiny_llama, tiny_model_dir):
    url = served[0] + "/contexts/a.kvz/manifest"
    result = CliRunner().invoke(app, ["generate", url, "--prompt", "Q", "-n", "4", "--model",
                                      str(tiny_model_dir), "--level", "lossless", "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["new_token_ids"] == local_tokens(tiny_llama)
    assert data["levels"] == ["lossless"] * 6
    human = CliRunner().invoke(app, ["generate", url, "--prompt", "Q", "-n", "2", "--model",
                                     str(tiny_model_dir), "--deadline", "30", "-q"])
    assert human.exit_code == 0, human.output
    assert "levels per chunk:" in human.stderr and "deadline 30.00 s met" in human.stderr
    refused = CliRunner().invoke(app, ["generate", url, "--prompt", "Q", "--compare", "-q"])
    assert refused.exit_code != 0 and "--compare needs a local .kvz" in refused.stderr


def test_recomputing_every_chunk_from_token_ids_gives_the_same_answer(served, tiny_llama):
    result = stream_generate(served[0] + "/contexts/a.kvz/manifest", "Q", tiny_llama,
                             levels=[], max_new_tokens=4)
    assert result.levels == [RECOMPUTE] * 6 and result.bytes_fetched == 0
    assert result.recompute_seconds > 0
    assert result.new_token_ids == local_tokens(tiny_llama)


def test_a_corrupt_chunk_stops_the_stream(context_dir, tiny_llama):
    data = bytearray((context_dir / "a.kvz").read_bytes())
    with open_kvz(context_dir / "a.kvz") as reader:
        data[reader.kv_entries("lossless")[3].offset + 10] ^= 0xFF
    with pytest.raises(FetchError, match="checksum mismatch"):
        stream_generate("http://test/a.kvz", "Q", tiny_llama, levels=["lossless"],
                        client=range_server(bytes(data)), policy=FAST)


def test_levels_drop_as_bandwidth_drops_and_the_deadline_holds(context_dir, tiny_llama):
    """One server per link speed; the controller starts from the true rate (initial_mbps)."""
    deadline, picks = 1.5, {}
    for mbps in (8.0, 1.0, 0.1):
        with serve_in_thread(create_app(context_dir, Throttle.constant(mbps))) as url:
            result = stream_generate(url + "/contexts/a.kvz/manifest", "Q", tiny_llama,
                                     deadline=deadline, initial_mbps=mbps, max_new_tokens=2)
        picks[mbps] = result
        print(f"{mbps} Mbit/s: {result.levels} ready {result.context_ready_seconds:.2f} s")
    assert picks[8.0].levels == ["lossless"] * 6
    assert picks[1.0].levels[0] != "lossless"  # the whole context at lossless cannot make it
    assert RECOMPUTE in picks[0.1].levels
    order = ["lossless", "high", "balanced", "small", RECOMPUTE]
    means = [sum(map(order.index, picks[m].levels)) / 6 for m in (8.0, 1.0, 0.1)]
    assert means == sorted(means)
    assert picks[8.0].deadline_met and picks[1.0].deadline_met


def test_a_slow_model_fetches_the_smallest_level_instead_of_recomputing(context_dir, tiny_llama):
    with serve_in_thread(create_app(context_dir, Throttle.constant(0.2))) as url:
        result = stream_generate(url + "/contexts/a.kvz/manifest", "Q", tiny_llama, deadline=0.5,
                                 initial_mbps=0.2, recompute_tokens_per_second=1.0,
                                 max_new_tokens=1)
    assert RECOMPUTE not in result.levels and result.levels[0] == "small"
    assert result.deadline_met is False  # nothing could meet it; this misses it by the least


def test_a_fast_model_recomputes_instead_of_fetching(context_dir, tiny_llama, monkeypatch):
    """On an accelerator the prefill speed is measured before the first decision; a model
    that recomputes faster than the link delivers recomputes (and gives the same answer)."""
    import kvzip.stream.client as client_module

    monkeypatch.setattr(client_module, "is_accelerator", lambda device: True)  # as on a GPU
    monkeypatch.setattr(type(tiny_llama), "prefill_rate", lambda self, tokens=256: 1e6)
    with serve_in_thread(create_app(context_dir, Throttle.constant(1.0))) as url:
        result = stream_generate(url + "/contexts/a.kvz/manifest", "Q", tiny_llama, deadline=5.0,
                                 initial_mbps=1.0, max_new_tokens=2)
    assert result.levels == [RECOMPUTE] * len(result.levels) and result.bytes_fetched == 0
    monkeypatch.setattr(client_module, "is_accelerator", lambda device: False)  # the CPU: as before
    with serve_in_thread(create_app(context_dir, Throttle.constant(1.0))) as url:
        fetched = stream_generate(url + "/contexts/a.kvz/manifest", "Q", tiny_llama, deadline=5.0,
                                  initial_mbps=1.0, max_new_tokens=2)
    assert RECOMPUTE not in fetched.levels
    assert result.new_token_ids == local_tokens(tiny_llama, 2)  # recomputed: exact


# ----------------------------------------------------------------------------- nginx
@pytest.fixture
def nginx(context_dir, tmp_path):
    with nginx_serving(context_dir, tmp_path) as url:
        yield url


def test_fetch_and_stream_from_nginx(nginx, context_dir, tiny_llama, tmp_path):
    fetch(nginx + "/a.kvz", tmp_path / "n.kvz")
    assert (tmp_path / "n.kvz").read_bytes() == (context_dir / "a.kvz").read_bytes()
    result = stream_generate(nginx + "/a.kvz", "Q", tiny_llama, levels=["lossless"],
                             max_new_tokens=4)
    assert result.new_token_ids == local_tokens(tiny_llama)


def test_decode_time_is_planned_from_a_prior_then_measured(context_dir, tiny_llama):
    """A decode prior no level can meet the deadline with: the fastest level (the smallest)
    is fetched, its real decode speed measured, and from then on it fits; a free decode
    leaves the choice to the network alone (lossless on an unthrottled link)."""
    with serve_in_thread(create_app(context_dir)) as url:
        manifest = url + "/contexts/a.kvz/manifest"
        slow = stream_generate(manifest, "Q", tiny_llama, deadline=5.0, decode_prior=1.0,
                               recompute_tokens_per_second=1e-3, max_new_tokens=1)
        free = stream_generate(manifest, "Q", tiny_llama, deadline=5.0, decode_prior=0.0,
                               max_new_tokens=1)
    assert slow.levels == ["small"] * 6
    assert slow.chunks[0].predicted_seconds > 5.0  # planned with the prior: hopeless
    assert slow.chunks[-1].predicted_seconds < 5.0  # planned with small's measured speed
    assert free.levels == ["lossless"] * 6
    assert slow.deadline_met and free.deadline_met
