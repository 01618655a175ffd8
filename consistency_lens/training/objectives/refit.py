"""E re-fitted to the texts the lens shows: D frozen, E alone learns to rebuild A from the
explanation `eval` and `explain` write (`ConsistencyLens.explanation`: D's best of its greedy,
sampled and prediction-begun texts under `decode`).

GRPO trains E on D's sampled texts at temperature 1, while a lens with `decode.samples` or
`decode.prediction` shows a text chosen among several, one of them begun with M's prediction:
texts E was never trained on. This objective closes that gap without changing a word of the
explanations (the choice never reads E unless `decode.reconstruction` is set, which it refuses),
and `train` gives the run the decode settings of the lens it starts from (`train.init_from`) for
every key the config leaves unset, so every text figure of the lens stays as it was and only KL
at P and FVE can move. The loss is the context ceiling's, on the shown text instead of the true
context.
"""

from __future__ import annotations

import torch

from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.training.objectives import register
from consistency_lens.training.objectives.ceiling import ContextCeilingObjective


@register("encoder_refit")
class EncoderRefitObjective(ContextCeilingObjective):
    """`mse_weight * mse_e + alpha * kl_e` of E reading the lens's shown explanation of A (D is
    never trained: its texts are written without a graph)."""

    term_titles = {
        "mse_e": "E's normalised MSE from the shown explanation",
        "kl_e": "KL at P with E(shown explanation) patched in",
        "alpha": "KL weight α",
    }

    def __init__(self, lens, cfg):
        super().__init__(lens, cfg)
        if cfg.train.init_from is None:
            raise LensError(
                "train.objective=encoder_refit re-fits the E of a saved lens to its texts; set "
                "train.init_from=LENS_DIR (its decode settings are then the run's own)."
            )
        if cfg.decode.reconstruction:
            raise LensError(
                "train.objective=encoder_refit needs decode.reconstruction=0: with it the text "
                "shown depends on E, which this objective trains; set decode.reconstruction=0."
            )

    def reconstruct(self, lens, batch: Batch) -> torch.Tensor:
        """E's Â (with its graph) from the explanation the lens shows for A."""
        # The text is chosen in full precision, as eval and explain choose it (training may run
        # under bf16 autocast, where near ties could flip the choice).
        with torch.autocast(batch.A.device.type, enabled=False):
            ids = lens.explanation(batch.A)
        return lens.encoder.encode_ids(ids)
