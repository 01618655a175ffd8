"""The plan's objective (docs/design.md section 2): loss = loss_lm + alpha * loss_kl (+ optional terms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.models.patching import kl_at_p, patched_kl
from consistency_lens.training.objectives import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    normalised_mse,
    register,
)


@dataclass
class LossOutput:
    """Scalar losses of one micro-batch (tensors; `loss` carries the graph) and detached extras."""

    loss: torch.Tensor
    """What backward runs on: `loss_lm + alpha*loss_kl + mse_weight*mse - entropy_weight*entropy`."""
    loss_kl: torch.Tensor
    """KL(M(A_target) || M(A)) at P, batchmean."""
    loss_lm: torch.Tensor
    """KL(P_orig || P_D) over D's text, batchmean over token positions; 0 when T_text == 1."""
    loss_mse: torch.Tensor
    """MSE between Â and A, both divided by the mean norm of A."""
    entropy: torch.Tensor
    """Mean entropy (nats) of D's token distributions."""
    a_hat: torch.Tensor
    """(B, d) detached reconstruction Â of A."""
    explanation_ids: torch.Tensor
    """(B, T_text) detached token ids D wrote for A."""


def lm_loss(token_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_orig || P_D) for tokens 1..T-1: D's logits that produced token t+1 vs M's at t.

    `orig_logits` are M's reading the text: of all T tokens or of the first T-1 (the last
    token's are never used).
    """
    length = token_logits.shape[1]
    if length < 2:
        return token_logits.new_zeros((), dtype=torch.float32)
    vocab = token_logits.shape[-1]
    p_d = token_logits[:, 1:].float().reshape(-1, vocab)
    p_orig = orig_logits[:, : length - 1].float().reshape(-1, vocab)
    return F.kl_div(
        F.log_softmax(p_d, dim=-1),
        F.softmax(p_orig, dim=-1),
        reduction="batchmean",
        log_target=False,
    )


def compute_losses(lens, batch: Batch, tau: float, alpha: float) -> LossOutput:
    """All losses of one micro-batch, exactly as docs/design.md section 2 pins them down."""
    train = lens.cfg.train
    a = batch.A.float()
    if a.dim() != 2 or a.shape[1] != lens.d_model:
        raise LensError(
            f"Activations have width {a.shape[-1]} but layer {lens.layer} of this model has "
            f"width {lens.d_model}; the dump was made with another model."
        )
    n = a.shape[0]
    residual = train.target == "residual"
    # A and A' go through D and E together: one batched pass instead of two. Only A's rows carry
    # a gradient (A' feeds a detached target) unless the entropy term reads A''s logits too.
    sources = torch.cat([a, batch.A_prime.float()]) if residual else a
    grad_rows = (0, n) if residual and not train.entropy_weight else None
    gen = lens.decoder.generate_soft(sources, train.t_text, tau, grad_rows=grad_rows)
    a_hat_all = lens.encoder(gen.ste_onehots, gen.discrete_token_ids, grad_rows=grad_rows)
    a_hat = a_hat_all[:n]
    if residual:
        a_target = a_hat + (sources[n:] - a_hat_all[n:]).detach()
    else:
        a_target = a_hat
    (loss_kl,) = patched_kl(
        lens.orig,
        batch.input_ids_A,
        batch.attention_mask_A,
        a,
        [a_target],
        direction="patched||clean",
    )

    token_logits = gen.token_logits[:n]
    ids = gen.discrete_token_ids[:n]
    if train.t_text > 1:
        # M never needs to read the text's last token: its logits would predict past the text.
        loss_lm = lm_loss(token_logits, lens.orig.token_logits(ids[:, :-1]))
    else:
        loss_lm = a.new_zeros(())

    loss_mse = normalised_mse(a_hat, a)
    # When it is only logged (weight 0), no graph is kept for it.
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(train.entropy_weight)):
        log_probs = F.log_softmax(gen.token_logits.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()

    loss = loss_lm + alpha * loss_kl
    if train.mse_weight:
        loss = loss + train.mse_weight * loss_mse
    if train.entropy_weight:
        loss = loss - train.entropy_weight * entropy
    return LossOutput(
        loss=loss,
        loss_kl=loss_kl,
        loss_lm=loss_lm,
        loss_mse=loss_mse,
        entropy=entropy,
        a_hat=a_hat.detach(),
        explanation_ids=ids.detach(),
    )


@register("plan")
class PlanObjective(Objective):
    """The plan's loss_lm + alpha * loss_kl, with the optional MSE and entropy terms of `train`."""

    terms = ("loss_kl", "loss_lm", "loss_mse", "entropy")
    coefficients = ("tau", "alpha")
    term_titles = {
        "loss_kl": "KL term (loss_kl)",
        "loss_lm": "LM term (loss_lm)",
        "loss_mse": "MSE term (loss_mse)",
        "entropy": "Entropy of D's token distributions",
        "tau": "Gumbel temperature τ",
        "alpha": "KL weight α",
    }
    linear_terms = ("entropy",)

    def __call__(self, lens, batch: Batch, step: StepInfo) -> ObjectiveOutput:
        """`compute_losses` at this step's tau and alpha."""
        out = compute_losses(lens, batch, step["tau"], step["alpha"])
        return ObjectiveOutput(loss=out.loss, terms={k: getattr(out, k) for k in self.terms})


__all__ = ["LossOutput", "PlanObjective", "compute_losses", "kl_at_p", "lm_loss"]
