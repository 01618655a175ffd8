"""Quick recipe loop for lens research: train an objective for N steps, then quick eval metrics.

usage: .venv/bin/python bench/lens_recipe.py NAME STEPS key=value ...  (overrides on config/demo.yaml;
THREADS=n sets torch threads, default 1). Saves the lens to runs/recipes/NAME and appends the metrics
to runs/recipes/results.jsonl. The metrics are docs/design.md section 5's with two simplifications
(shuffled = the next sample's Â; specificity over the last 16 context tokens and M's top-5 with a
short stop-word list); the CLI's `eval` is the one that counts (BENCHMARKS.md).
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.loading import load_for_config
from consistency_lens.models.patching import kl_per_sample

STOP = set(
    "the a an of to and in is it that for on as with was be by at this are from or but not have "
    "has had we our i you he she they them his her its their which who will would there been were "
    "so if all".split()
)


def words(text: str) -> set[str]:
    """Content words of a text: lower-cased letters and digits, stop-words dropped."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP}


def main() -> None:
    """Train NAME for STEPS with the overrides, save the lens, print and append the metrics."""
    name = sys.argv[1]
    steps = int(sys.argv[2])
    overrides = sys.argv[3:]
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    cfg = load_config([Path("config/demo.yaml")], ["device=cpu", *overrides])
    loaded = load_for_config(cfg)
    lens = ConsistencyLens.build(cfg, loaded)
    if cfg.train.init_from is not None:
        lens.init_from(cfg.train.init_from)
    where = (cfg.output_dir, cfg.model, cfg.layer, cfg.corpus)
    train_ds = ActivationDataset(split_dir(*where, "train"), seed=0)
    val_ds = ActivationDataset(split_dir(*where, "val"), seed=0)
    collate = CollateFn(pad_id=loaded.pad_id)
    log = []
    t0 = time.time()
    if steps:
        from consistency_lens.training.objectives import build_objective, step_info

        obj = build_objective(lens, cfg)
        opt = torch.optim.AdamW(lens.param_groups())
        g = torch.Generator().manual_seed(0)
        bs = cfg.train.batch_size
        for step in range(steps):
            idx = torch.randint(len(train_ds), (bs,), generator=g).tolist()
            batch = collate([train_ds[i] for i in idx])
            lens.train(True)
            out = obj(lens, batch, step_info(type(obj), cfg, step))
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for grp in lens.param_groups() for p in grp["params"]], 1.0
            )
            # cosine-free: constant lr with 5 warmup steps
            for grp in opt.param_groups:
                base = cfg.train.lr if grp.get("name") == "proj" else cfg.train.lr_blocks
                grp["lr"] = base * min(1.0, (step + 1) / 5)
            opt.step()
            if step % 10 == 0 or step == steps - 1:
                row = {
                    "step": step,
                    "loss": float(out.loss),
                    **{k: float(v) for k, v in out.terms.items()},
                }
                log.append(row)
                print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    train_time = time.time() - t0
    lens.train(False)
    if steps:
        lens.save_pretrained(f"runs/recipes/{name}")
    res = quick_eval(lens, val_ds, train_ds, collate, loaded, cfg)
    res.update(name=name, steps=steps, overrides=overrides, train_s=round(train_time))
    print(json.dumps(res, indent=1))
    Path("runs/recipes").mkdir(parents=True, exist_ok=True)
    with open("runs/recipes/results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


@torch.no_grad()
def quick_eval(lens, val_ds, train_ds, collate, loaded, cfg, n: int = 128) -> dict:
    """KL vs shuffled and mean, FVE, cosine, diversity, specificity and perplexity on n val samples."""
    tok = loaded.tokenizer
    mean = torch.stack([train_ds[i]["A"] for i in range(0, len(train_ds), 4)]).mean(0)
    idx = list(range(n))
    As, Ahats, texts, ctxs, top5s, kls, klm, ids_all, inputs = ([] for _ in range(9))
    for s in range(0, n, 32):
        b = collate([val_ds[i] for i in idx[s : s + 32]])
        ids, ahat = lens.reconstruct(b.A.float())
        logits = lens.orig.forward_with_replacement(
            b.input_ids_A, b.attention_mask_A, [b.A, ahat, mean.expand_as(b.A)]
        )
        kls.append(kl_per_sample(logits[0], logits[1]))
        klm.append(kl_per_sample(logits[0], logits[2]))
        top5 = logits[0].topk(5, dim=-1).indices
        for r in range(len(ids)):
            texts.append(tok.decode(ids[r]))
            ctx_ids = b.input_ids_A[r][b.attention_mask_A[r].bool()][-16:]
            ctxs.append(words(tok.decode(ctx_ids)))
            top5s.append(words(" ".join(tok.decode([t]) for t in top5[r])))
        As.append(b.A.float())
        Ahats.append(ahat)
        inputs.append(b)
        ids_all.append(ids)
    A = torch.cat(As)
    Ah = torch.cat(Ahats)
    # shuffled: derangement = roll by 1 over whole set
    Ah_sh = Ah.roll(1, 0)
    kl_sh = []
    for j, b in enumerate(inputs):
        sl = slice(32 * j, 32 * j + len(b))
        logits = lens.orig.forward_with_replacement(
            b.input_ids_A, b.attention_mask_A, [b.A, Ah_sh[sl]]
        )
        kl_sh.append(kl_per_sample(logits[0], logits[1]))
    kl_lens = torch.cat(kls)
    kl_shuf = torch.cat(kl_sh)
    kl_mean = torch.cat(klm)
    fve = 1 - ((A - Ah) ** 2).sum() / ((A - A.mean(0)) ** 2).sum()
    fve_meanvec = 1 - ((A - mean) ** 2).sum() / ((A - A.mean(0)) ** 2).sum()
    cos = torch.nn.functional.cosine_similarity(A, Ah).mean()

    # specificity
    def rate(pairs):
        hit = tot = 0
        for tw, ctx, top in pairs:
            for w in tw:
                tot += 1
                hit += w in ctx or w in top
        return hit / max(tot, 1)

    tws = [words(t) for t in texts]
    own = rate([(tws[i], ctxs[i], top5s[i]) for i in range(n)])
    der = rate([(tws[i], ctxs[(i + 1) % n], top5s[(i + 1) % n]) for i in range(n)])
    # perplexity under M
    ids = torch.cat(ids_all)
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    pre = torch.cat([torch.full_like(ids[:, :1], bos), ids], 1)
    lg = lens.orig.token_logits(pre)[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(lg.flatten(0, 1), ids.flatten())
    return {
        "kl_lens": round(float(kl_lens.mean()), 3),
        "kl_shuffled": round(float(kl_shuf.mean()), 3),
        "kl_mean": round(float(kl_mean.mean()), 3),
        "kl_rec_vs_shuffled": round(1 - float(kl_lens.mean() / kl_shuf.mean()), 3),
        "kl_rec_vs_mean": round(1 - float(kl_lens.mean() / kl_mean.mean()), 3),
        "fve": round(float(fve), 3),
        "fve_meanvec": round(float(fve_meanvec), 3),
        "cos": round(float(cos), 3),
        "distinct": round(len(set(texts)) / n, 3),
        "spec_own": round(own, 3),
        "spec_deranged": round(der, 3),
        "ppl": round(float(nll.exp()), 1),
        "examples": [
            (
                tok.decode(inputs[0].input_ids_A[r][inputs[0].attention_mask_A[r].bool()][-8:]),
                texts[r],
            )
            for r in range(6)
        ],
    }


if __name__ == "__main__":
    main()
