"""A bounded load test: 32 concurrent clients, each fetching its own context from one real server."""

from __future__ import annotations

import statistics
import threading
import time
import zlib

import httpx
import pytest
from test_stream_helpers import write_random_context

from kvzip.formats import open_kvz
from kvzip.stream.fetch import fetch
from kvzip.stream.server import create_app, serve_in_thread

CLIENTS = 32


@pytest.fixture(scope="module")
def contexts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    for i in range(CLIENTS):
        write_random_context(tiny_llama, root / f"ctx{i:02d}.kvz", tokens=96, seed=i)
    return root


def test_32_concurrent_clients_fetch_their_contexts_without_error(contexts, tmp_path):
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(i: int, base: str) -> None:
        name = f"ctx{i:02d}.kvz"
        try:
            with httpx.Client(timeout=30) as http:
                start.wait(timeout=30)  # every client starts at once
                t0 = time.perf_counter()
                manifest = http.get(f"{base}/contexts/{name}/manifest").json()
                mine = [time.perf_counter() - t0]
                for chunk in manifest["chunks"]:
                    loc = chunk["levels"]["lossless"]
                    t0 = time.perf_counter()
                    response = http.get(base + loc["url"])
                    mine.append(time.perf_counter() - t0)
                    if response.status_code != 200 or zlib.crc32(response.content) != loc["crc32"]:
                        raise AssertionError(f"{name} chunk {chunk['chunk']}: bad payload")
                t0 = time.perf_counter()
                fetch(f"{base}/{name}", tmp_path / name, client=http)  # verifies every checksum
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            with lock:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")

    with serve_in_thread(create_app(contexts)) as base:
        threads = [threading.Thread(target=client, args=(i, base)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[:3]
    for i in range(CLIENTS):
        name = f"ctx{i:02d}.kvz"
        assert (tmp_path / name).read_bytes() == (contexts / name).read_bytes()
        with open_kvz(tmp_path / name) as reader:
            assert reader.verify() == []
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), cuts[98]
    print(f"\n{len(latencies)} requests from {CLIENTS} clients: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")
    assert 0 < p50 <= p99 < 30
