"""How well M's own later blocks name M's next token from A alone (a patchscope), the reading
`decode.prediction` rewards: A written at block L into a fixed prompt's slot, M's top-k there,
against M's true top-5 at P (which reads the whole context). Beside it, how often the lens's own
explanation (as its `decode` settings write it) names one of those true top-5 content words.

usage: OMP_NUM_THREADS=1 .venv/bin/python bench/patchscope.py LENS [--corpora sotu,pydoc,...]
           [--prompts "Thought:<embed>|The next word:<embed>|<embed>"] [key=value ...]
(overrides on config/demo.yaml, which says where the dumps are; the eval's 128 samples of each
corpus's val split, dumped by `eval corpus=C` already). Nothing is trained.
"""

import argparse
import sys
from pathlib import Path

import torch

from consistency_lens.config import LensConfig, load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.metrics import mean_ci
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.models.decoding import prediction_from_activation
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.utils.words import names_prediction

TRUE_TOP = 5


def measure(
    lens: ConsistencyLens, ds: ActivationDataset, cfg: LensConfig, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Per-sample 0/1 rows: each prompt's top-1 in M's true top-5, each prompt's top-5 / top-10
    holding a content word of M's true top-5, and the lens's explanation holding one."""
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    words = lens.orig.content_word_ids()
    idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
    rows: dict[str, list[torch.Tensor]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        rows.setdefault(name, []).append(values.float().cpu())

    with torch.no_grad():
        for start in range(0, len(idx), cfg.eval.batch_size):
            b = collate([ds[i] for i in idx[start : start + cfg.eval.batch_size]])
            a = b.A.to(lens.orig.device)
            true = lens.orig.clean_logits(b.input_ids_A, b.attention_mask_A).topk(TRUE_TOP).indices
            for prompt in prompts:
                scope = prediction_from_activation(lens, a, 10, prompt)
                add(f"{prompt!r} top-1 in M's top-5", (scope[:, :1] == true).any(-1))
                for k in (5, 10):
                    hit = names_prediction(words, scope[:, None, :k], true)[:, 0]
                    add(f"{prompt!r} top-{k}: a content word of M's top-5", hit)
            ids, _ = lens.reconstruct(a)
            add(
                "the lens's explanation: a content word of M's top-5",
                names_prediction(words, ids[:, None, :], true)[:, 0],
            )
    return {name: torch.cat(values) for name, values in rows.items()}


def main(argv: list[str]) -> None:
    """Print each row's share of samples with its bootstrap CI, per corpus."""
    parser = argparse.ArgumentParser()
    parser.add_argument("lens")
    parser.add_argument("--corpora", default="sotu,pydoc,corpus_licenses")
    parser.add_argument("--prompts", default="Thought:<embed>|The next word:<embed>|<embed>")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(["config/demo.yaml"], overrides)
    torch.manual_seed(cfg.seed)
    # As eval loads it: on cfg.device, with any decode.* override applied to its explanations.
    lens, _ = load_lens(cfg, Path(args.lens))
    lens.eval()
    for corpus in args.corpora.split(","):
        ds = ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, corpus, "val"), seed=cfg.seed
        )
        print(f"\n{corpus} ({min(len(ds), cfg.eval.num_samples)} samples): share [95% CI]")
        for name, values in measure(lens, ds, cfg, args.prompts.split("|")).items():
            lo, hi = mean_ci(values, cfg.eval.bootstrap, cfg.seed)
            print(f"| {name} | {values.mean():.2f} [{lo:.2f}, {hi:.2f}] |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
