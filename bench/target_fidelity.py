"""How faithfully a lens's D writes its own warm-start target: the share of D's greedy tokens equal
to the target's, per position, on the eval's held-out samples of several genres.

With `bench/target_ceiling.py` (what a perfect copy of each target would score) this splits a
lens's gap to the context ceiling into the target's part and D's part.

usage: OMP_NUM_THREADS=1 .venv/bin/python bench/target_fidelity.py LENS [LENS ...]
           [--corpora sotu,pydoc,corpus_licenses] [key=value ...]  (overrides on config/demo.yaml,
           e.g. output_dir: where the val splits are)
The target is the one the lens's own config names (`train.predict`, as `warm_start_predict`
builds it), compared in reading order (what `generate` returns, whatever `decoder_rotate` is).
"""

import argparse
import sys

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.training.objectives.warm_start import first_content_token, predict_targets


def main(argv: list[str]) -> None:
    """Print, per lens and corpus, the per-position and whole-text exact-match rates."""
    parser = argparse.ArgumentParser()
    parser.add_argument("lenses", nargs="+")
    parser.add_argument("--corpora", default="sotu,pydoc,corpus_licenses")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(["config/demo.yaml"], overrides)
    for path in args.lenses:
        lens = ConsistencyLens.from_pretrained(path, device="cpu").eval()
        own = lens.cfg.train  # the config the lens was trained with
        # The warm-start objective stays recorded when the lens was started from a warm-started
        # one (`train.init_from`, `warm_start.steps` 0), as bench/gpu_lens.sh and the shipped lens do.
        if "warm_start_predict" not in (own.objective, own.warm_start.objective):
            print(
                f"{path}: not warm-started on warm_start_predict ({own.warm_start.objective}); skipped"
            )
            continue
        if (lens.cfg.model, lens.cfg.layer) != (cfg.model, cfg.layer):
            print(f"{path}: a lens of {lens.cfg.model} block {lens.cfg.layer}; set model/layer")
            continue
        predict, t = own.predict, own.t_text
        first = (
            first_content_token(lens.orig.content_word_ids())
            if predict.first == "content"
            else None
        )
        collate = CollateFn(pad_id=lens.loaded.pad_id)
        print(f"{path} (k {predict.tokens}, first {predict.first}, order {predict.order})")
        for corpus in args.corpora.split(","):
            ds = ActivationDataset(
                split_dir(cfg.output_dir, cfg.model, cfg.layer, corpus, "val"), seed=cfg.seed
            )
            idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
            hits = []
            with torch.no_grad():
                for start in range(0, len(idx), cfg.eval.batch_size):
                    b = collate([ds[i] for i in idx[start : start + cfg.eval.batch_size]])
                    target = predict_targets(
                        lens, b, t, predict.tokens, first, predict.order == "prediction_first"
                    )
                    hits.append((lens.decoder.generate(b.A, t) == target).float())
            h = torch.cat(hits)
            cells = " | ".join(f"{v:.3f}" for v in h.mean(0).tolist())
            print(f"| {corpus} | {cells} | {h.all(1).float().mean():.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
