"""How much of A each warm-start target text can carry at all: an E of the lens's shape trained on
the target text alone (as `train-ceiling` trains one on the true context), then KL at P and FVE
on held-out activations of several genres, each against the context ceiling trained the same way.

Under the same E training (MSE only, the ceiling's budget), a target whose E cannot beat the
context ceiling is no text to copy to beat it: that part of the gap is the target's, not D's. A
lens's own E also trains on the KL at P and on GRPO's samples, so this bounds the targets, not
every lens.

usage: OMP_NUM_THREADS=1 .venv/bin/python bench/target_ceiling.py [--corpora sotu,pydoc,...]
           [--only context --only 'k 2, first' ...]
           key=value ...   (overrides on config/demo.yaml; train.steps and train.batch_size are
                            the budget of each E, as for the demo's ceiling: 200 and 8)
Each target's E is trained from the same fresh E (same seed) on the train split of the config's
dump; the eval's 128 samples of each corpus's val split (dumped by `eval` already) score it.
"""

import argparse
import sys

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.metrics import bootstrap_ci, fve, kl_recovered, mean_ci
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.patching import patched_kl
from consistency_lens.training.objectives import normalised_mse
from consistency_lens.training.objectives.warm_start import context_targets, predict_targets
from consistency_lens.training.optim import build_optimizer
from consistency_lens.utils.words import first_content_token


def targets(lens: ConsistencyLens, t: int) -> dict:
    """Each target as `warm_start` / `warm_start_predict` builds it (reading order), with the
    rotation E reads it by: the recipes' `train.encoder_rotate=k`, M's k tokens first, so that E
    ends on the token at P as the ceiling's E does (M's continuation alone has no such token)."""
    content = first_content_token(lens.orig.content_word_ids())
    return {
        "context (the ceiling)": (lambda b: context_targets(b, t), 0),
        "k 1, first content": (lambda b: predict_targets(lens, b, t, 1, content), 1),
        "k 2, greedy": (lambda b: predict_targets(lens, b, t, 2), 2),
        "k 2, first content (the recipes' target)": (
            lambda b: predict_targets(lens, b, t, 2, content),
            2,
        ),
        f"k {t}, greedy (M's continuation alone)": (lambda b: predict_targets(lens, b, t, t), 0),
    }


def train_e(lens: ConsistencyLens, build, rotate: int, ds: ActivationDataset, cfg, collate) -> None:
    """E alone by MSE on `build(batch)` read with `rotate`, cfg.train's steps and batch."""
    optimizer, scheduler = build_optimizer(lens.param_groups(), cfg.train)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.train.steps):
        idx = torch.randint(0, len(ds), (cfg.train.batch_size,), generator=gen).tolist()
        b = collate([ds[i] for i in idx])
        with torch.no_grad():
            ids = build(b)
        loss = cfg.train.mse_weight * normalised_mse(
            lens.encoder.encode_ids(ids, rotate=rotate), b.A.float()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def score(lens: ConsistencyLens, build, rotate: int, ds: ActivationDataset, cfg, collate) -> tuple:
    """Per-sample KL at P (clean||patched) and (A, Â) on the eval's samples of `ds`."""
    idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
    kls, As, hats = [], [], []
    with torch.no_grad():
        for start in range(0, len(idx), cfg.eval.batch_size):
            b = collate([ds[i] for i in idx[start : start + cfg.eval.batch_size]])
            hat = lens.encoder.encode_ids(build(b), rotate=rotate)
            a = b.A.float()
            (kl,) = patched_kl(lens.orig, b.input_ids_A, b.attention_mask_A, a, [hat])
            kls.append(kl.float())
            As.append(a)
            hats.append(hat.float())
    return torch.cat(kls), torch.cat(As), torch.cat(hats)


def main(argv: list[str]) -> None:
    """Train one E per target, then print each one's KL at P, FVE and kl_recovered over the
    context ceiling, with bootstrap CIs, per corpus."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpora", default="sotu,pydoc,corpus_licenses")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="train only the targets whose name starts with this (repeatable; target names hold "
        "commas), e.g. 'context' for the context ceiling alone at train.t_text",
    )
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(["config/demo.yaml"], ["train.steps=200", *overrides])
    torch.manual_seed(cfg.seed)
    fresh = ConsistencyLens.build(cfg)
    for p in fresh.decoder.parameters():  # E alone learns; D's text is the target itself
        p.requires_grad_(False)
    initial = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    collate = CollateFn(pad_id=fresh.loaded.pad_id)
    train_set = ActivationDataset(
        split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, "train"), seed=cfg.seed
    )
    corpora = args.corpora.split(",")
    evals = {
        c: ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, c, "val"), seed=cfg.seed
        )
        for c in corpora
    }
    results: dict[str, dict] = {}
    every = targets(fresh, cfg.train.t_text)
    only = [part.strip() for part in args.only if part.strip()]
    unknown = [part for part in only if not any(name.startswith(part) for name in every)]
    if unknown:
        parser.error(f"--only {unknown} names no target; they are: {list(every)}")
    chosen = {
        name: target for name, target in every.items() if not only or name.startswith(tuple(only))
    }
    if "context (the ceiling)" not in chosen:
        parser.error("--only must keep 'context': the other targets are read against it")
    for name, (build, rotate) in chosen.items():
        fresh.load_trainable_state_dict(initial)
        train_e(fresh, build, rotate, train_set, cfg, collate)
        results[name] = {
            c: score(fresh, build, rotate, ds, cfg, collate) for c, ds in evals.items()
        }
        print(f"trained: {name}", flush=True)
    boot, seed = cfg.eval.bootstrap, cfg.seed
    for c in corpora:
        ceil_kl, _, _ = results["context (the ceiling)"][c]
        print(f"\n{c}: target | KL at P [CI] | FVE | kl_recovered over the context ceiling [CI]")
        for name, per_corpus in results.items():
            kl, a, hat = per_corpus[c]
            lo, hi = mean_ci(kl, boot, seed)
            rec = kl_recovered(kl, ceil_kl)
            rlo, rhi = bootstrap_ci(kl_recovered, kl, ceil_kl, resamples=boot, seed=seed)
            print(
                f"| {name} | {kl.mean():.3f} [{lo:.2f}, {hi:.2f}] | {fve(a, hat):.3f} | "
                f"{rec:.3f} [{rlo:.2f}, {rhi:.2f}] |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
