"""Supervised warm start: D learns to write a text tied to A, E learns to rebuild A from that text.

Gumbel-STE on the consistency loss alone finds a few constant codes (docs/design.md section 6). The
field's later lens-style systems start instead from supervision: here D is taught, teacher-forced,
to write the `t_text` corpus tokens ending at P (they are in the batch already) or, with
`warm_start_next`, the `t_text` tokens after P (`input_ids_next` in the dump) or, with
`warm_start_predict`, the context tokens ending at P and M's own next tokens (so the text carries
what M is about to predict, not what the corpus happened to say; `train.predict` chooses how many,
the first of them and their place; the dump of a config that runs it stores them, `predicted_ids`,
else each step runs M over the context for them); E is taught to
rebuild A from the *true* text, by MSE and by the KL of M at P with E's reconstruction patched in.
The consistency objectives (`grpo`, `plan`) then continue from the saved lens (`train.init_from`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from consistency_lens.config import LensConfig, ObjectiveSettings
from consistency_lens.data.collate import Batch
from consistency_lens.data.layout import prediction_header
from consistency_lens.errors import LensError
from consistency_lens.models.patching import patched_kl
from consistency_lens.training.objectives import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    normalised_mse,
    register,
)


def context_targets(batch: Batch, t_text: int) -> torch.Tensor:
    """The `t_text` context tokens ending at P (B, t_text); shorter contexts repeat their first token."""
    ids, mask = batch.input_ids_A, batch.attention_mask_A
    if ids.shape[1] < t_text:
        pad = ids[:, :1].expand(-1, t_text - ids.shape[1])
        ids, mask = torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), mask], 1)
    ids, mask = ids[:, -t_text:], mask[:, -t_text:]
    # Left padding would teach D to write pad tokens: use the row's first real token instead.
    first = ids.gather(1, mask.long().argmax(1, keepdim=True))
    return torch.where(mask.bool(), ids, first)


def supervised_losses(
    lens,
    batch: Batch,
    target_ids: torch.Tensor,
    with_kl: bool = True,
    target_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D's cross-entropy on `target_ids`, E's normalised MSE and KL(M(E(target)) || M(A)) at P.

    `target_mask` (B, T) marks the real tokens of right-padded targets: D is not taught the
    padding and E reads each text without it. Without `with_kl` the KL is 0 and M's patched
    forward (most of the step's cost on a CPU: it reads the whole context) is skipped.
    """
    a = batch.A.float()
    logits = lens.decoder.teacher_forced_logits(a, target_ids)
    labels = target_ids if target_mask is None else target_ids.masked_fill(target_mask == 0, -100)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    if target_mask is None:
        a_hat = lens.encoder.encode_ids(target_ids)
    else:
        # E reads left-padded text (its state at the last column is what it projects): each row
        # rolled right by its padding, as one gather (per-row rolls would read the shifts back).
        width = target_ids.shape[1]
        shifts = (target_mask == 0).sum(1, keepdim=True)
        cols = (torch.arange(width, device=target_ids.device) - shifts) % width
        ids, mask = target_ids.gather(1, cols), target_mask.gather(1, cols)
        a_hat = lens.encoder.encode_ids(ids, mask)
    mse = normalised_mse(a_hat, a)
    kl = a.new_zeros(())
    if with_kl:
        ids, mask = batch.input_ids_A, batch.attention_mask_A
        (kl,) = patched_kl(lens.orig, ids, mask, a, [a_hat], "patched||clean")
    return ce, mse, kl


@register("warm_start")
class WarmStartObjective(Objective):
    """`ce_d + mse_weight * mse_e + alpha * kl_e` on the context tokens ending at P (kl_e is
    reported as 0, not computed, while alpha is 0)."""

    terms = ("ce_d", "mse_e", "kl_e")
    coefficients = ("alpha",)
    term_titles = {
        "ce_d": "D's cross-entropy on the target text",
        "mse_e": "E's normalised MSE from the target text",
        "kl_e": "KL at P with E(target text) patched in",
        "alpha": "KL weight α",
    }

    def __init__(self, lens, cfg: LensConfig):
        super().__init__(lens, cfg)

    def targets(self, lens, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text D is taught to write for each activation, and its mask (None: no padding)."""
        return context_targets(batch, self.cfg.train.t_text), None

    def __call__(self, lens, batch: Batch, step: StepInfo) -> ObjectiveOutput:
        """Teacher-forced D and E on this batch's target texts."""
        ids, mask = self.targets(lens, batch)
        ce, mse, kl = supervised_losses(lens, batch, ids, step["alpha"] > 0, mask)
        loss = ce + self.cfg.train.mse_weight * mse + step["alpha"] * kl
        return ObjectiveOutput(loss=loss, terms={"ce_d": ce, "mse_e": mse, "kl_e": kl})


@register("warm_start_next")
class WarmStartNextObjective(WarmStartObjective):
    """The warm start on the corpus tokens after P (`input_ids_next`) instead of those ending at P."""

    def next_tokens_needed(self) -> int:
        """`train.t_text`: the text is taught from the corpus tokens after P."""
        return self.cfg.train.t_text

    def targets(self, lens, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `t_text` corpus tokens after P (fewer, right-padded, near a sequence's end)."""
        t_text = self.cfg.train.t_text
        return batch.input_ids_next[:, :t_text], batch.attention_mask_next[:, :t_text]


def predict_targets(
    lens,
    batch: Batch,
    t_text: int,
    k: int,
    first: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prediction_first: bool = False,
    continuation: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last `t_text - k` context tokens ending at P, then M's `k` greedy next tokens (B, t_text)
    (the first of them chosen by `first` when given; the continuation before the context tokens
    with `prediction_first`). `continuation` (B, k), when given, is those tokens already computed
    (the dump's), and M is not run."""
    if continuation is None:
        ids, mask = batch.input_ids_A, batch.attention_mask_A
        continuation = lens.orig.greedy_continuation(ids, mask, k, first)
    if k == t_text:
        return continuation
    parts = [context_targets(batch, t_text - k), continuation]
    return torch.cat(parts[::-1] if prediction_first else parts, 1)


class PredictConfig(ObjectiveSettings):
    """Settings of the `warm_start_predict` objective (`train.predict`)."""

    tokens: int = Field(2, ge=1)
    """How many of the `t_text` target tokens are M's continuation after P (the rest are the
    context tokens ending at P); 1..`t_text`, checked where `warm_start_predict` is used."""

    first: Literal["greedy", "content"] = "greedy"
    """M's first predicted token: its top-1 (`greedy`), or its highest-ranked content word among
    its top-5 predictions at P, its top-1 when none is (`content`: the text then names a word a
    reader can use, where M's top-1 is often ` the` or `,`); the later tokens are greedy after it."""

    order: Literal["context_first", "prediction_first"] = "context_first"
    """Where M's tokens go in the target: after the context tokens (`context_first`, a text that
    reads on from the context), or before them (`prediction_first`: D's first token, where D with A
    written at block L reads M's own prediction, is taught that prediction)."""

    def fit_problem(self, t_text: int) -> str | None:
        """Why `tokens` does not fit in a text of `t_text` tokens (one sentence, no full stop), or
        None when it does: the one check, run by `TrainConfig` and by the objective."""
        if 1 <= self.tokens <= t_text:
            return None
        return (
            f"train.predict.tokens must be between 1 and train.t_text ({t_text}), got "
            f"{self.tokens}; set train.predict.tokens within that range or raise train.t_text"
        )


@register("warm_start_predict")
class WarmStartPredictObjective(WarmStartObjective):
    """The warm start on the context ending at P and M's continuation after P (`train.predict`)."""

    settings_class = PredictConfig
    section = "predict"

    def __init__(self, lens, cfg: LensConfig):
        super().__init__(lens, cfg)
        # The warm start's config is built by `model_copy`, which skips TrainConfig's validators.
        if problem := self.settings.fit_problem(cfg.train.t_text):
            raise LensError(f"{problem}.")
        self.first = lens.orig.first_pick(self.settings.first)
        self.predicted = prediction_header(self.settings.tokens, self.settings.first, lens.orig)

    def stored_predictions(self) -> dict:
        """The header of a dump whose `predicted_ids` are exactly this objective's continuation."""
        return self.predicted

    def targets(self, lens, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context tokens ending at P and M's `train.predict.tokens` next tokens, in the set order
        (the dump's, where the batch has them: `stored_predictions`)."""
        k = self.settings.tokens
        before = self.settings.order == "prediction_first"
        stored = batch.predicted_ids
        targets = predict_targets(lens, batch, self.cfg.train.t_text, k, self.first, before, stored)
        return targets, None
