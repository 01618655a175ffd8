"""Where a lens's text is disfluent: M's mean NLL at each position of the lens's greedy texts
(read after BOS, as the eval's perplexity reads them) on the first 128 eval samples of each
corpus's val split, beside the same figures for the true last T_text context tokens ending at P
(the text the context ceiling reads): the perplexity a lens that copied the context exactly
would have, i.e. a baseline for the eval's perplexity target on that genre.

usage: .venv/bin/python bench/text_nll_by_position.py [--corpora sotu,pydoc,...] LENS [LENS ...]
(config/demo.yaml's dumps; `eval ... corpus=C` has dumped each corpus's val split already)
"""

import argparse
from pathlib import Path

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.models.lens import ConsistencyLens


def position_nll(lens: ConsistencyLens, ids: torch.Tensor) -> torch.Tensor:
    """M's NLL (B, T) of each token of texts `ids`, read after BOS as the eval's perplexity."""
    pre = torch.cat([torch.full_like(ids[:, :1], lens.orig.bos_id), ids], 1)
    logp = torch.log_softmax(lens.orig.token_logits(pre)[:, :-1].float(), -1)
    return -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def report(name: str, nll: torch.Tensor) -> None:
    """One line: mean NLL per position and the eval's perplexity (exp of the mean text NLL)."""
    per_position = [round(x, 2) for x in nll.mean(0).tolist()]
    print(f"  {name}: mean NLL per position {per_position} ppl {nll.mean(1).mean().exp():.1f}")


def main(corpora: list[str], lenses: list[str]) -> None:
    """Print, per corpus, each lens's NLL per text position and perplexity, and the context's."""
    for corpus in corpora:
        cfg = load_config([Path("config/demo.yaml")], [f"corpus={corpus}"])
        ds = ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, "val"), seed=cfg.seed
        )
        idx = sample_indices(len(ds), 128, cfg.seed)
        print(corpus)
        reported: set[int] = set()  # the context is printed once per T_text among the lenses
        for lens_dir in lenses:
            lens, _ = load_lens(cfg, Path(lens_dir))
            t_text = lens.cfg.train.t_text
            collate = CollateFn(pad_id=lens.loaded.pad_id)
            texts, contexts = [], []
            with torch.no_grad():
                for s in range(0, len(idx), 32):
                    b = collate([ds[i] for i in idx[s : s + 32]])
                    ids, _ = lens.reconstruct(b.A, greedy=True)
                    texts.append(position_nll(lens, ids))
                    if t_text not in reported:
                        # Rows with fewer than T_text real tokens are left out, as eval does.
                        ctx, mask = b.last_context(t_text)
                        keep = mask.sum(dim=1) == t_text
                        if keep.any():
                            contexts.append(position_nll(lens, ctx[keep]))
            if t_text not in reported:
                reported.add(t_text)
                if contexts:
                    nll = torch.cat(contexts)
                    report(f"true last {t_text} context tokens ({len(nll)} samples)", nll)
            report(lens_dir, torch.cat(texts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default="sotu", help="comma-separated corpora (eval's names)")
    parser.add_argument("lenses", nargs="+")
    args = parser.parse_args()
    main(args.corpora.split(","), args.lenses)
