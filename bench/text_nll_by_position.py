"""Where a lens's text is disfluent: M's mean NLL at each position of the lens's greedy texts
(read after BOS, as the eval's perplexity reads them) on the first 128 eval samples of the
config's val split.

usage: .venv/bin/python bench/text_nll_by_position.py LENS [LENS ...]  (config/demo.yaml's dump)
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.saved_lens import load_lens


def main(lenses: list[str]) -> None:
    """Print each lens's mean NLL per text position and its perplexity."""
    for lens_dir in lenses:
        cfg = load_config(["config/demo.yaml"], [])
        lens, _ = load_lens(cfg, Path(lens_dir))
        ds = ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, "val"), seed=cfg.seed
        )
        idx = sample_indices(len(ds), 128, cfg.seed)
        collate = CollateFn(pad_id=lens.loaded.pad_id)
        rows = []
        with torch.no_grad():
            for s in range(0, 128, 32):
                b = collate([ds[i] for i in idx[s : s + 32]])
                ids, _ = lens.reconstruct(b.A, greedy=True)
                pre = torch.cat([torch.full_like(ids[:, :1], lens.orig.bos_id), ids], 1)
                logp = F.log_softmax(lens.orig.token_logits(pre)[:, :-1].float(), -1)
                rows.append(-logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        nll = torch.cat(rows)
        print(
            lens_dir,
            "mean NLL per position",
            [round(x, 2) for x in nll.mean(0).tolist()],
            "ppl",
            round(float(nll.mean(1).mean().exp()), 1),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
