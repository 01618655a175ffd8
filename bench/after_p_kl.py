"""How much M's predictions after P read the state at P after block L: the mean KL at the
positions after P (M reading the corpus's true next tokens) and at P itself, with the lens's
reconstruction Â, A's training mean, another sample's A, or zero written at P, on the eval's
128 val activations of each corpus (what `train.rl.next_reward` rewards). Nothing is trained.

usage: OMP_NUM_THREADS=2 .venv/bin/python bench/after_p_kl.py LENS CORPUS [CORPUS ...]
(CORPUS: the val split's directory name under `config/demo.yaml`'s dump directory, e.g. `sotu`,
`corpus_js`, dumped already by `eval corpus=C`.)
"""

import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from consistency_lens.config import load_config
from consistency_lens.data.collate import Batch, CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import split_dir
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.models.patching import patched_kl, patched_kl_after
from consistency_lens.training.objectives.grpo import NEXT_POSITIONS as POSITIONS


def mean_kls(
    orig, items: Iterable[tuple[Batch, torch.Tensor, dict[str, torch.Tensor]]]
) -> dict[str, tuple[float, float]]:
    """Mean KL after P (first `POSITIONS` next tokens) and at P of each named vector set, over
    (batch, its A, {name: vectors written at P}) items, read lazily under no grad."""
    after: dict[str, list[torch.Tensor]] = {}
    at: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for b, a, sets in items:
            vectors = list(sets.values())
            kls_after = patched_kl_after(
                orig,
                b.input_ids_A,
                b.attention_mask_A,
                b.input_ids_next[:, :POSITIONS],
                b.attention_mask_next[:, :POSITIONS],
                a,
                vectors,
            )
            kls_at = patched_kl(orig, b.input_ids_A, b.attention_mask_A, a, vectors)
            for name, x, y in zip(sets, kls_after, kls_at, strict=True):
                after.setdefault(name, []).append(x)
                at.setdefault(name, []).append(y)
    return {k: (float(torch.cat(after[k]).mean()), float(torch.cat(at[k]).mean())) for k in after}


def main(lens_dir: str, corpora: list[str]) -> None:
    """Print, per corpus, the mean KL after P and at P for each vector written at P."""
    torch.manual_seed(0)
    cfg = load_config(["config/demo.yaml"], [])
    lens, _ = load_lens(cfg, Path(lens_dir))
    lens.eval()
    mean = next(iter(load_file(str(Path(lens_dir) / "train_mean.safetensors")).values())).float()
    collate = CollateFn(pad_id=lens.loaded.pad_id)

    def written(a: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "the lens's Â": lens.reconstruct(a)[1].float(),
            "A's training mean": mean.expand_as(a),
            "another sample's A": a.roll(1, 0),
            "zero": torch.zeros_like(a),
        }

    for corpus in corpora:
        ds = ActivationDataset(
            split_dir(cfg.output_dir, cfg.model, cfg.layer, corpus, "val"), seed=cfg.seed
        )
        idx = sample_indices(len(ds), cfg.eval.num_samples, cfg.seed)
        batches = [
            collate([ds[i] for i in idx[s : s + cfg.eval.batch_size]])
            for s in range(0, len(idx), cfg.eval.batch_size)
        ]
        items = ((b, a, written(a)) for b in batches for a in [b.A.float()])
        print(f"\n{corpus}: | written at P | KL after P (mean of {POSITIONS}) | KL at P |")
        for name, (after, at) in mean_kls(lens.orig, items).items():
            print(f"| {name} | {after:.4f} | {at:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: bench/after_p_kl.py LENS CORPUS [CORPUS ...]")
    main(sys.argv[1], sys.argv[2:])
