"""Where one training step's time goes: the parts of a config's objective timed inside real steps
(D's generation, D's teacher-forced passes, E, M's patched KL, M's text NLL, backward), the
rest (M's forward for the targets, the optimizer, the trainer) as the remainder.

usage: OMP_NUM_THREADS=2 .venv/bin/python bench/step_parts.py [--config config/demo.yaml]
           [--steps 3] [key=value ...]
on the config's dump (`make demo` writes the demo's), from a freshly built lens: timings, not
training. Prints the mean seconds per step of each part over `--steps` steps after one warm-up.
"""

import argparse
import collections
import sys
import time
from collections.abc import Callable

import torch

from consistency_lens.config import load_config
from consistency_lens.training import trainer
from consistency_lens.training.objectives import grpo, warm_start


def main(argv: list[str]) -> None:
    """Build the run of the config (its warm start skipped), time `--steps` steps."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config/demo.yaml")
    parser.add_argument("--steps", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(
        [args.config], [*overrides, "train.run_dir=/tmp/step_parts", "train.warm_start.steps=0"]
    )
    run = trainer._build_run(cfg, *trainer.load_splits(cfg))
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(owner: object, name: str, label: str) -> None:
        inner: Callable = getattr(owner, name)

        def wrapper(*a: object, **k: object) -> object:
            start = time.perf_counter()
            out = inner(*a, **k)
            seconds[label] += time.perf_counter() - start
            return out

        setattr(owner, name, wrapper)

    timed(run.lens.decoder, "generate", "D's generation (no grad)")
    timed(run.lens.decoder, "teacher_forced_logits", "D's teacher-forced passes")
    timed(run.lens.encoder, "encode_ids", "E (forward)")
    timed(grpo, "patched_kl", "M's patched KL at P")
    timed(warm_start, "patched_kl", "M's patched KL at P")
    timed(run.lens.orig, "text_nll", "M's NLL of the texts")
    timed(run.lens.orig, "greedy_continuation", "M's continuation (targets)")
    timed(torch.Tensor, "backward", "backward")
    trainer._train_step(run)  # warm-up
    seconds.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer._train_step(run)
    total = (time.perf_counter() - start) / args.steps
    print(f"{cfg.train.objective}, batch {cfg.train.batch_size}: {total:.2f} s per step")
    for label, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {label} | {value / args.steps:.2f} s |")
    print(f"| the rest | {total - sum(seconds.values()) / args.steps:.2f} s |")


if __name__ == "__main__":
    main(sys.argv[1:])
