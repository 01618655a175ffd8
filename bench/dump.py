"""Dump throughput vs. a bare forward through block L vs. the naive full forward, side by side.

Run: .venv/bin/python bench/dump.py [num_samples] [layer]
All three use the same model, the same batches (same sequences and positions) and alternate in
rounds, so the printed ratios are robust to this machine's noise.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

import torch

from consistency_lens.config import config_from_dict
from consistency_lens.data.corpus import tokenized_corpus
from consistency_lens.data.dump import _bos_id, dump_activations, plan_splits
from consistency_lens.models.hooks import run_until
from consistency_lens.models.loading import load_model


def _batches(plan, batch_size, pad):
    out = []
    for start in range(0, len(plan.sequences), batch_size):
        seqs = plan.sequences[start : start + batch_size]
        pos = plan.positions[start : start + batch_size]
        width = int(pos.max()) + 1
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : min(len(seq), width)] = torch.from_numpy(seq[:width])
        out.append((ids, torch.as_tensor(pos)))
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model("smollm2-135m", device="cpu")
    layer = int(sys.argv[2]) if len(sys.argv) > 2 else loaded.parts.num_blocks // 2
    work = tempfile.mkdtemp()
    base = {
        "layer": layer,
        "num_samples": n,
        "val_samples": 0,
        "seq_len": 128,
        "batch_size": 16,
        "cache_dir": "data/corpus",
        "shard_size": 4096,
    }
    cfg = config_from_dict({**base, "output_dir": f"{work}/0"})
    corpus = tokenized_corpus(cfg.corpus, loaded.tokenizer, cfg.cache_dir)  # warm the token cache
    plan = plan_splits(cfg, corpus, _bos_id(loaded.tokenizer))[0]["train"]
    batches = _batches(plan, cfg.batch_size, loaded.tokenizer.pad_token_id)
    block = loaded.parts.blocks[layer]
    times = {"dump": [], "bare": [], "naive": []}
    for rnd in range(3):
        tic = time.perf_counter()
        dump_activations(config_from_dict({**base, "output_dir": f"{work}/{rnd}"}), loaded)
        times["dump"].append(time.perf_counter() - tic)
        with torch.inference_mode():
            tic = time.perf_counter()
            for ids, pos in batches:
                run_until(loaded.model, block, input_ids=ids, use_cache=False)[
                    torch.arange(len(ids)), pos
                ]
            times["bare"].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            for ids, pos in batches:
                out = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False)
                out.hidden_states[layer + 1][torch.arange(len(ids)), pos]
            times["naive"].append(time.perf_counter() - tic)
    shutil.rmtree(work)
    rate = {k: n / min(v) for k, v in times.items()}
    mean_p = float(plan.positions.mean())
    print(
        f"model smollm2-135m ({loaded.parts.num_blocks} blocks, {loaded.model.dtype}), layer {layer}, "
        f"{n} samples, seq_len 128, mean P {mean_p:.1f}, batch 16, threads {torch.get_num_threads()}"
    )
    for key in ("dump", "bare", "naive"):
        print(f"  {key:6s} {rate[key]:8.1f} samples/s   (best of 3: {min(times[key]):.2f} s)")
    print(f"  dump / bare forward through L : {rate['dump'] / rate['bare']:.2f}x  (target >= 0.85)")
    print(f"  dump / naive full forward     : {rate['dump'] / rate['naive']:.2f}x  (target >= 1.7)")


if __name__ == "__main__":
    main()
