"""Dump throughput: grouped by P vs. plan order vs. a bare forward vs. the naive forward.

Run: .venv/bin/python bench/dump.py [num_samples] [layer] [--threads N] [--no-baselines]
`dump` is `consistency-lens dump` (batches sorted by P within a shard); `dump-plan-order` is the
same command with the batches in plan order, as before the dump grouped them (each runs to its
largest P, close to seq_len). `bare` and `naive` run the plan-order batches through block L / the
whole model. All use the same model and samples and alternate in rounds, so the printed ratios
are robust to this machine's noise; each is timed by wall clock and by this process's CPU time (the
steadier of the two on a shared machine, best with `--threads 1`). The two dumps' stored
activations are compared at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial

import numpy as np
import torch

import consistency_lens.data.dump as dump_mod
from consistency_lens.config import config_from_dict
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.dump import _bos_id, dump_activations, plan_splits
from consistency_lens.data.layout import split_dir
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


def _plan_order_activations(
    loaded, cfg, plan, idx, progress, task, predict=None
) -> tuple[torch.Tensor, None]:
    """The dump's forwards before it grouped batches by P: batches of `idx` in plan order (this
    bench's config stores no continuation of M, so `predict` is None)."""
    out = []
    for start in range(0, len(idx), cfg.batch_size):
        batch = idx[start : start + cfg.batch_size]
        out.append(
            dump_mod._forward_batch(
                loaded, cfg.layer, [plan.sequences[i] for i in batch], plan.positions[batch]
            )
        )
        progress.update(task, advance=len(batch))
    return torch.cat(out), None


def _stored(directory) -> dict[int, torch.Tensor]:
    ds = ActivationDataset(directory)
    return {int(ds.seq_index[i]): ds.sample(i)[1] for i in range(len(ds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num_samples", type=int, nargs="?", default=256)
    parser.add_argument("layer", type=int, nargs="?", default=None, help="default: half depth")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-baselines", action="store_true", help="time only the two dumps (not bare, naive)"
    )
    args = parser.parse_args()
    n = args.num_samples
    paths = ["dump", "dump-plan-order"] + ([] if args.no_baselines else ["bare", "naive"])
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m", device="cpu")
    layer = args.layer if args.layer is not None else loaded.parts.num_blocks // 2
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
    corpus = dump_mod._shared_corpus(cfg, loaded, 0, 1)  # each part, as the dump reads it
    plan = plan_splits(cfg, corpus, _bos_id(loaded.tokenizer))[0]["train"]
    batches = _batches(plan, cfg.batch_size, loaded.tokenizer.pad_token_id)
    block = loaded.parts.blocks[layer]
    dumps = {"dump": dump_mod._grouped_activations, "dump-plan-order": _plan_order_activations}

    def run_dump(key: str, out: str) -> None:
        dump_mod._grouped_activations = dumps[key]
        try:
            dump_activations(config_from_dict({**base, "output_dir": out}), loaded)
        finally:
            dump_mod._grouped_activations = dumps["dump"]

    def bare() -> None:
        with torch.inference_mode():
            for ids, pos in batches:
                run_until(loaded.model, block, input_ids=ids, use_cache=False)[
                    torch.arange(len(ids)), pos
                ]

    def naive() -> None:
        with torch.inference_mode():
            for ids, pos in batches:
                out = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False)
                out.hidden_states[layer + 1][torch.arange(len(ids)), pos]

    # Wall time and this process's CPU time: on a shared machine the CPU time is the steadier.
    times: dict[str, list[tuple[float, float]]] = {}
    for rnd in range(3):
        jobs = {
            "dump": partial(run_dump, "dump", f"{work}/g{rnd}"),
            "dump-plan-order": partial(run_dump, "dump-plan-order", f"{work}/p{rnd}"),
            "bare": bare,
            "naive": naive,
        }
        for key, job in jobs.items():
            if key not in paths:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            job()
            times.setdefault(key, []).append(
                (time.perf_counter() - wall, time.process_time() - cpu)
            )
    where = (cfg.model, cfg.layer, cfg.corpus)
    new = _stored(split_dir(f"{work}/g0", *where, "train"))
    old = _stored(split_dir(f"{work}/p0", *where, "train"))
    shutil.rmtree(work)
    # Today's dump is not shape-invariant either: a sample's A depends on its batch's width.
    # The yardstick: plan-order A against each sample run alone (width P + 1), same storage dtype.
    alone = {}
    for i in range(min(n, 32)):
        act = dump_mod._forward_batch(loaded, layer, [plan.sequences[i]], plan.positions[i : i + 1])
        alone[int(plan.seq_index[i])] = act[0].to(getattr(torch, cfg.dtype)).float()
    diff = [float((new[k].float() - old[k].float()).abs().max()) for k in old]
    diff_alone = [float((alone[k] - old[k].float()).abs().max()) for k in alone]
    scale = max(float(v.float().abs().max()) for v in old.values())
    rate = {k: n / min(w for w, _ in v) for k, v in times.items()}
    cpu_rate = {k: n / min(c for _, c in v) for k, v in times.items()}
    mean_p = float(plan.positions.mean())
    plan_w = [int(plan.positions[s : s + 16].max()) + 1 for s in range(0, n, 16)]
    sorted_p = np.sort(plan.positions)
    grouped_w = [int(sorted_p[s : s + 16].max()) + 1 for s in range(0, n, 16)]
    print(
        f"model smollm2-135m ({loaded.parts.num_blocks} blocks, {loaded.model.dtype}), layer {layer}, "
        f"{n} samples, seq_len 128, mean P {mean_p:.1f}, batch 16, threads {torch.get_num_threads()}"
    )
    print(
        f"  mean batch width: plan order {np.mean(plan_w):.1f}, grouped by P {np.mean(grouped_w):.1f}"
    )
    for key in times:
        print(
            f"  {key:15s} {rate[key]:8.1f} samples/s wall, {cpu_rate[key]:8.1f} per CPU-s "
            f"(best of 3: {min(w for w, _ in times[key]):.2f} s wall)"
        )
    for label, r in (("wall", rate), ("CPU time", cpu_rate)):
        print(
            f"  dump grouped by P / plan order ({label}): "
            f"{r['dump'] / r['dump-plan-order']:.2f}x  (target >= 1.6)"
        )
    print(
        f"  stored A ({cfg.dtype}), grouped vs plan order: {sum(d == 0 for d in diff)}/{len(diff)} "
        f"bitwise equal, max |diff| {max(diff):.3g}; plan order vs each sample alone (first "
        f"{len(alone)}): max |diff| {max(diff_alone):.3g}; largest |A| {scale:.3g}"
    )
    if not args.no_baselines:
        print(
            "  dump plan order / bare forward through L : "
            f"{rate['dump-plan-order'] / rate['bare']:.2f}x"
        )
        print(f"  dump / naive full forward                : {rate['dump'] / rate['naive']:.2f}x")


if __name__ == "__main__":
    main()
