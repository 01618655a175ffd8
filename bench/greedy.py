"""M's greedy continuation after P, kv-cached against re-reading the context per token (the
`warm_start_predict` target), timed side by side on the embedded model.

usage: .venv/bin/python bench/greedy.py [--batch 8] [--seq 64] [--k 2 4] [--repeats 5]
Prints, per k, the best-of-`repeats` CPU seconds of each path (alternating) and their ratio, and
how many rows' tokens differ between the two paths (near-ties can flip under bf16).
"""

import argparse
import json
import time

import torch

from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper


def main() -> None:
    """Time both paths for each k on one left-padded batch of random-length corpus-like ids."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", device="cpu", dtype=args.dtype)
    orig = OriginalModelWrapper(loaded, layer=20)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=gen)
    ids, mask = left_pad([torch.randint(100, 20000, (int(n),), generator=gen) for n in lengths], 0)
    for k in args.k:
        best = {"cached": float("inf"), "uncached": float("inf")}
        paths = {"cached": orig.greedy_continuation, "uncached": orig._greedy_uncached}
        out = {}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                t0 = time.process_time()
                out[name] = fn(ids, mask, k)
                best[name] = min(best[name], time.process_time() - t0)
        differ = int((out["cached"] != out["uncached"]).any(-1).sum())
        print(
            json.dumps(
                {
                    "k": k,
                    "batch": args.batch,
                    "seq": args.seq,
                    "dtype": str(loaded.model.dtype),
                    "cached_s": round(best["cached"], 3),
                    "uncached_s": round(best["uncached"], 3),
                    "speedup": round(best["uncached"] / best["cached"], 2),
                    "rows_differing": differ,
                }
            )
        )


if __name__ == "__main__":
    main()
