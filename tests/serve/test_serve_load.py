"""A bounded load test on localhost: 8 concurrent clients, 320 requests (some abandoned mid-way),
no error and no growth in memory; it stops by itself."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest
from serving import tiny_lenses

from consistency_lens.serve.app import create_app, load_lenses
from consistency_lens.serve.background import running

TEXTS = ["the nation economy congress people", "we must have peace", "trade union state year"]


def _rss_mb() -> float:
    """This process's resident memory in MB (the server runs in one of its threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status to read memory from")


async def _clients(base: str, rounds: int, clients: int = 8) -> dict[int, int]:
    """`clients` concurrent clients, `rounds` requests each; returns status -> count (0: left)."""
    import httpx

    counts: dict[int, int] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        text = TEXTS[i % len(TEXTS)]
        kind = i % 10
        try:
            if kind == 9:  # a client that gives up almost at once
                await client.post(f"{base}/api/explain", json={"text": text}, timeout=0.005)
                status = 200
            elif kind == 8:
                r = await client.post(
                    f"{base}/api/samples", json={"text": text, "position": 1, "num": 2}
                )
                status = r.status_code
            elif kind == 7:
                r = await client.post(f"{base}/api/explain", json={"text": text, "lens": "nope"})
                status = r.status_code
            else:
                lens = "alpha" if kind % 2 else "beta"
                r = await client.post(f"{base}/api/explain", json={"text": text, "lens": lens})
                status = r.status_code
        except httpx.TimeoutException:
            status = 0
        counts[status] = counts.get(status, 0) + 1

    async def worker(c: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            for r in range(rounds):
                await one(client, c * rounds + r)

    await asyncio.gather(*(worker(c) for c in range(clients)))
    return counts


def test_a_bounded_load_gives_no_error_and_no_memory_growth(tmp_path, tiny_llama_dir):
    cfg, paths = tiny_lenses(tmp_path, tiny_llama_dir)
    app = create_app(load_lenses(cfg, paths))
    with running(app) as base:
        asyncio.run(_clients(base, rounds=10))  # warm up: allocator pools, lazy imports
        gc.collect()
        before = _rss_mb()
        counts = asyncio.run(_clients(base, rounds=30))
        gc.collect()
        after = _rss_mb()
        # Jobs of clients that gave up are dropped when their handler next polls the connection
        # (every 0.05 s) or run if already started: the queue drains shortly after the clients
        # return, and must not keep a leaked job.
        worker, deadline = app.state.worker, time.monotonic() + 30
        while worker.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.pending == 0
    assert sum(counts.values()) == 240
    assert set(counts) <= {0, 200, 404}, counts  # only the planned refusals, no 5xx
    assert counts.get(404) == 24
    assert after - before < 25, (before, after)
