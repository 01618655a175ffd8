"""The best-of-N explanation (`decode.*`), timed side by side: every candidate written in one
batched generation with D's log-probabilities read off it (`models/decoding.py`), against one
generation per candidate and a teacher-forced pass of D to score them (how it ran before), and
D's greedy text alone.

usage: OMP_NUM_THREADS=2 .venv/bin/python bench/decode.py LENS [--corpus sotu] [--batch 32]
           [--repeats 3] [key=value ...]
(overrides on config/demo.yaml, which says where the dumps are; the corpus's val split must be
dumped, e.g. by `eval corpus=C`). Prints best-of-`repeats` wall seconds per path (alternating),
their ratio and how many rows keep the same text on both paths.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.models.decoding import (
    best_of_samples,
    explanation_scores,
    prediction_from_activation,
)
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.patching import token_nll
from consistency_lens.utils.words import names_prediction


def one_at_a_time(lens: ConsistencyLens, acts: torch.Tensor, cfg) -> torch.Tensor:
    """The same choice as `best_of_samples`, written as before: one generation per candidate,
    then one teacher-forced pass of D and one M pass over every candidate."""
    t_text = lens.cfg.train.t_text
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [lens.decoder.generate(acts, t_text, greedy=True)]
    rows += [
        lens.decoder.generate(
            acts, t_text, greedy=False, temperature=cfg.temperature, generator=gen
        )
        for _ in range(cfg.samples)
    ]
    words = lens.orig.content_word_ids()
    top = None
    if cfg.prediction:
        top = prediction_from_activation(lens, acts, cfg.prediction_top)
        content = words[top] >= 0
        first = top.gather(1, content.long().argmax(1, keepdim=True)).squeeze(1)
        rows.append(lens.decoder.generate(acts, t_text, greedy=True, first=first))
    ids = torch.stack(rows, 1)
    batch, n, _ = ids.shape
    flat = ids.flatten(0, 1)
    logits = lens.decoder.teacher_forced_logits(acts.repeat_interleave(n, 0), flat)
    d_logprob = -token_nll(logits, flat).view(batch, n)
    nll = lens.orig.text_nll(flat).view(batch, n)
    has_content = (words[ids] >= 0).any(-1)
    named = None if top is None else names_prediction(words, ids, top)
    scores = explanation_scores(d_logprob, nll, has_content, cfg, named)
    return ids[torch.arange(batch), scores.argmax(1)]


def main(argv: list[str]) -> None:
    """Time the three paths on the first `--batch` val activations of `--corpus`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("lens")
    parser.add_argument("--corpus", default="sotu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(["config/demo.yaml"], overrides)
    lens, _ = load_lens(cfg, Path(args.lens))
    lens.eval()
    decode = lens.cfg.decode.filled()
    if decode.reconstruction:
        raise SystemExit("bench/decode.py times the setting without decode.reconstruction.")
    ds = ActivationDataset(
        split_dir(cfg.output_dir, cfg.model, cfg.layer, args.corpus, "val"), seed=cfg.seed
    )
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    acts = collate([ds[i] for i in range(args.batch)]).A.to(lens.orig.device)
    t_text = lens.cfg.train.t_text
    paths = {
        "batched (shipped)": lambda: best_of_samples(lens, acts, decode),
        "one at a time (before)": lambda: one_at_a_time(lens, acts, decode),
        "greedy text alone": lambda: lens.decoder.generate(acts, t_text, greedy=True),
    }
    best = dict.fromkeys(paths, float("inf"))
    out = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in paths.items():
                start = time.perf_counter()
                out[name] = fn()
                best[name] = min(best[name], time.perf_counter() - start)
    print(
        f"{args.batch} activations of {args.corpus}, {decode.samples} samples"
        f"{' + the prediction candidate' if decode.prediction else ''}, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}:"
    )
    for name, seconds in best.items():
        ratio = seconds / best["batched (shipped)"]
        print(f"| {name} | {seconds:.2f} s | {ratio:.2f}x the batched path |")
    same = (out["batched (shipped)"] == out["one at a time (before)"]).all(-1)
    print(f"rows keeping the same text on both paths: {int(same.sum())} of {args.batch}")


if __name__ == "__main__":
    main(sys.argv[1:])
