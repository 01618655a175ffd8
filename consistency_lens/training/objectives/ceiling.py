"""The context ceiling's objective: E alone learns to rebuild A from the true context tokens.

The reference a lens's text is judged against (docs/design.md section 7): an E of the lens's
shape that only ever reads the true last `t_text` tokens ending at P, exactly the input eval's
`context_tokens` and `context_ceiling` rows give it (left-padded and masked when the context is
shorter). D is not used: its weights stay as built. `consistency-lens train-ceiling` runs it.
"""

from __future__ import annotations

import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.models.patching import patched_kl
from consistency_lens.training.objectives import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    normalised_mse,
    register,
)


@register("context_ceiling")
class ContextCeilingObjective(Objective):
    """`mse_weight * mse_e + alpha * kl_e` of E reading the true last `t_text` context tokens
    (kl_e is reported as 0, not computed, while alpha is 0)."""

    terms = ("mse_e", "kl_e")
    coefficients = ("alpha",)
    term_titles = {
        "mse_e": "E's normalised MSE from the true context tokens",
        "kl_e": "KL at P with E(true context tokens) patched in",
        "alpha": "KL weight α",
    }

    def __init__(self, lens, cfg: LensConfig):
        super().__init__(lens, cfg)
        if cfg.distributed.strategy != "none":
            # D's weights are trainable but unused: DDP would wait for their gradients.
            raise LensError(
                f"train.objective={self.name} trains E alone in one process; set "
                "distributed.strategy=none."
            )

    def __call__(self, lens, batch: Batch, step: StepInfo) -> ObjectiveOutput:
        """E on this batch's true last `t_text` context tokens."""
        a = batch.A.float()
        a_hat = self.reconstruct(lens, batch)
        mse = normalised_mse(a_hat, a)
        kl = a.new_zeros(())
        if step["alpha"] > 0:
            (kl,) = patched_kl(
                lens.orig, batch.input_ids_A, batch.attention_mask_A, a, [a_hat], "patched||clean"
            )
        loss = self.cfg.train.mse_weight * mse + step["alpha"] * kl
        return ObjectiveOutput(loss=loss, terms={"mse_e": mse, "kl_e": kl}, a_hat=a_hat)

    def reconstruct(self, lens, batch: Batch) -> torch.Tensor:
        """E's Â from the true last `t_text` context tokens: the ceiling's validation reads what it
        learns from (D is never trained here, so its text would say nothing)."""
        ids, mask = batch.last_context(self.cfg.train.t_text)
        # In order whatever `train.encoder_rotate` says: the ceiling reads the context as it is.
        return lens.encoder.encode_ids(ids, mask, rotate=0)
