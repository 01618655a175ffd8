"""At which block does the state at P feed M's later predictions? For each block L, the mean KL
after P (M reading the corpus's true next tokens) and at P when block L's output at P is replaced
by the val set's mean A at that block, another sample's A, or zero: where the ratio after / at is
larger, a reward after P (`train.rl.next_reward`) has more to work with. No lens is read but
for its model; nothing is trained.

usage: OMP_NUM_THREADS=2 .venv/bin/python bench/after_p_by_layer.py CORPUS [CORPUS ...]
       [--layers 5,10,15,20,25]
(CORPUS: a val split's directory name under `config/demo.yaml`'s dump directory, as for
`bench/after_p_kl.py`; its stored block-20 activations are not used, only its token ids.)
"""

import argparse
import sys
from pathlib import Path

import torch

from consistency_lens.config import load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper

sys.path.insert(0, str(Path(__file__).parent))
from after_p_kl import POSITIONS, mean_kls  # noqa: E402  (a sibling script, as step_ops imports gpu)


def main(argv: list[str]) -> None:
    """Print one table per corpus: a row per block, KL after P and at P for each ablation."""
    parser = argparse.ArgumentParser()
    parser.add_argument("corpora", nargs="+")
    parser.add_argument("--layers", default="5,10,15,20,25")
    args = parser.parse_args(argv)
    cfg = load_config(["config/demo.yaml"], [])
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, device="cpu", dtype=cfg.model_dtype)
    layers = [int(x) for x in args.layers.split(",")]
    for corpus in args.corpora:
        ds = ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, corpus, "val"), seed=cfg.seed
        )
        idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
        collate = CollateFn(pad_id=loaded.pad_id)
        batches = [
            collate([ds[i] for i in idx[s : s + cfg.eval.batch_size]])
            for s in range(0, len(idx), cfg.eval.batch_size)
        ]
        print(f"\n{corpus}, {len(idx)} samples: KL after P (mean of {POSITIONS}) / KL at P")
        print("| block | the val mean A | another sample's A | zero | after / at (mean A) |")
        print("|---|---|---|---|---|")
        for layer in layers:
            orig = OriginalModelWrapper(loaded, layer)
            with torch.no_grad():
                acts = [orig.activations(b.input_ids_A, b.attention_mask_A) for b in batches]
            mean = torch.cat(acts).float().mean(0)
            items = (
                (
                    b,
                    a,
                    {
                        "mean": mean.expand_as(a).to(a.dtype),
                        "other": a.roll(1, 0),
                        "zero": torch.zeros_like(a),
                    },
                )
                for b, a in zip(batches, acts, strict=True)
            )
            cells = mean_kls(orig, items)
            row = " | ".join(f"{x:.3f} / {y:.2f}" for x, y in cells.values())
            ratio = cells["mean"][0] / max(cells["mean"][1], 1e-9)
            print(f"| {layer} | {row} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
