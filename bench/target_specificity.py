"""Specificity of the warm-start targets themselves: what the eval would score if D wrote each
target text perfectly (the ceiling a warm-start target gives the eval's buckets).

usage: .venv/bin/python bench/target_specificity.py key=value ...  (overrides on config/demo.yaml).
The `first content` and `prediction first` rows build the targets of
`train.predict.first=content` and `train.predict.order=prediction_first`.
Uses the eval's own samples, derangement, content words, buckets and bootstrap on the val split
of the dump the config names; nothing is trained.
"""

import sys

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.faithfulness import derangement
from consistency_lens.evaluation.metrics import fraction_unique, perplexity
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.specificity import specificity
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.training.objectives.warm_start import (
    context_targets,
    first_content_token,
    predict_targets,
)
from consistency_lens.utils.words import TOP_PREDICTIONS, content_words


def main(overrides: list[str]) -> None:
    """Print each target's unique fraction, perplexity under M and per-bucket own / deranged rates
    with their CIs."""
    cfg = load_config(["config/demo.yaml"], overrides)
    lens = ConsistencyLens.build(cfg)
    tok = lens.loaded.tokenizer
    ds = ActivationDataset(
        split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, "val"), seed=cfg.seed
    )
    idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    t = cfg.train.t_text
    content = first_content_token(lens.orig.content_word_ids())
    # Each target as `warm_start` / `warm_start_predict` builds it (k, first, prediction_first).
    targets = {"context (warm_start)": lambda b: context_targets(b, t)}
    for k in (1, 2, t):
        targets[f"predict k={k}"] = lambda b, k=k: predict_targets(lens, b, t, k)
    for k in (1, 2):
        targets[f"predict k={k}, first content"] = lambda b, k=k: predict_targets(
            lens, b, t, k, content
        )
        targets[f"predict k={k}, prediction first"] = lambda b, k=k: predict_targets(
            lens, b, t, k, None, True
        )
        targets[f"predict k={k}, first content, prediction first"] = lambda b, k=k: predict_targets(
            lens, b, t, k, content, True
        )
    rows: dict[str, list] = {name: [] for name in [*targets, "next corpus tokens"]}
    top5 = []
    with torch.no_grad():
        for start in range(0, len(idx), cfg.eval.batch_size):
            b = collate([ds[i] for i in idx[start : start + cfg.eval.batch_size]])
            for name, build in targets.items():
                rows[name].append(build(b))
            logits = lens.orig.clean_logits(b.input_ids_A, b.attention_mask_A)
            top5.append(logits.float().topk(TOP_PREDICTIONS, -1).indices)
    window = cfg.eval.context_window
    buckets = {
        "context": [content_words(tok, ds.sample(i)[0][-window:].tolist()) for i in idx],
        "next_tokens": [content_words(tok, ds.next_tokens(i).tolist()) for i in idx],
        "top5": [content_words(tok, r) for r in torch.cat(top5).tolist()],
    }
    perm = derangement(len(idx), cfg.seed)
    # The corpus tokens after P, unpadded (fewer near a sequence's end), as the eval reads them.
    rows["next corpus tokens"] = [[ds.next_tokens(i)[:t].tolist() for i in idx]]
    for name, parts in rows.items():
        ids = [row for part in parts for row in (part if isinstance(part, list) else part.tolist())]
        texts = [tok.decode(r) for r in ids]
        spec = specificity([content_words(tok, r) for r in ids], buckets, perm, 1000, cfg.seed)
        cells = "; ".join(
            f"{b} {v['own']:.3f}/{v['deranged']:.3f} "
            f"[{v['difference_ci'][0]:.3f}, {v['difference_ci'][1]:.3f}]"
            for b, v in spec["buckets"].items()
        )
        # Perplexity under M as the eval scores D's texts (rows of equal length only).
        ppl = "-"
        if len({len(r) for r in ids}) == 1:
            with torch.no_grad():
                ppl = f"{perplexity(lens.orig.text_nll(torch.tensor(ids))):.1f}"
        print(
            f"{name}: unique {fraction_unique(texts):.2f}, perplexity {ppl}, "
            f"words {spec['content_words']}: {cells}"
        )
        print("   e.g.", texts[:4])


if __name__ == "__main__":
    main(sys.argv[1:])
