"""M's warm-start targets (its greedy continuation after P) over a padded batch against the same
rows packed end to end (`models/inputs.pack`), timed side by side on the config's training dump.

usage: OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py [--config config/demo.yaml]
           [--batches 12] [--repeats 3] [key=value ...]
(`make demo` writes the demo's dump). Prints best-of-`repeats` wall seconds per batch of each
path (alternating), their ratio, the batches' share of padding, and whether every token agrees.
"""

import argparse
import sys
import time

import numpy as np
import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.models import inputs
from consistency_lens.models.loading import load_for_config
from consistency_lens.models.orig import OriginalModelWrapper
from consistency_lens.training import trainer
from consistency_lens.training.objectives.warm_start import first_content_token


def main(argv: list[str]) -> None:
    """Time `greedy_continuation` padded and packed on random training batches of the config."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config/demo.yaml")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config([args.config], overrides)
    train_split = trainer.load_splits(cfg)[0]
    loaded = load_for_config(cfg)
    collate = CollateFn(pad_id=loaded.pad_id)
    rng = np.random.default_rng(cfg.seed)
    size = cfg.train.batch_size
    batches = [
        collate([train_split[int(i)] for i in rng.integers(0, len(train_split), size)])
        for _ in range(args.batches)
    ]
    orig, k = OriginalModelWrapper(loaded, cfg.layer), cfg.train.predict.tokens
    pick = first_content_token(orig.content_word_ids())
    devices = {"padded": frozenset(), "packed": inputs.PACK_DEVICES}
    best = {name: float("inf") for name in devices}
    tokens: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, pack_on in devices.items():
            inputs.PACK_DEVICES = pack_on
            start = time.perf_counter()
            tokens[name] = [
                orig.greedy_continuation(b.input_ids_A, b.attention_mask_A, k, pick)
                for b in batches
            ]
            best[name] = min(best[name], (time.perf_counter() - start) / len(batches))
    padding = 1 - float(np.mean([float(b.attention_mask_A.float().mean()) for b in batches]))
    same = all(torch.equal(a, b) for a, b in zip(tokens["padded"], tokens["packed"], strict=True))
    print(
        f"batch {size}, {args.batches} batches, padding {padding:.0%}: padded "
        f"{best['padded']:.3f} s, packed {best['packed']:.3f} s per batch "
        f"({best['padded'] / best['packed']:.2f}x); same tokens: {same}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
