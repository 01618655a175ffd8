"""The scores training and evaluation share: the one helper for "KL of M at P with X patched in"
(train, validation, eval, samples and explain) and its twin at the positions after P, per-token
NLL, and the reconstruction errors."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean negative log-likelihood; `logits[:, t]` must predict `targets[:, t]`."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -picked.mean(-1)


def mse(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    return float(((A.float() - A_hat.float()) ** 2).mean())


def fve(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """Fraction of variance explained: `1 - sum ||A - Â||² / sum ||A - mean(A)||²`."""
    A = A.float()
    residual = ((A - A_hat.float()) ** 2).sum()
    total = ((A - A.mean(0, keepdim=True)) ** 2).sum().clamp(min=1e-12)
    return float(1.0 - residual / total)


def kl_at_p(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)), batchmean, in float32."""
    return F.kl_div(
        F.log_softmax(logits_q.float(), dim=-1),
        F.softmax(logits_p.float(), dim=-1),
        reduction="batchmean",
        log_target=False,
    )


def kl_per_sample(logits_ref: torch.Tensor, logits_other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_ref) || softmax(logits_other)) for each row of (B, V) logits, in nats."""
    log_p = F.log_softmax(logits_ref.float(), dim=-1)
    log_q = F.log_softmax(logits_other.float(), dim=-1)
    # Clamp tiny negative values that come from float rounding when both rows are equal.
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)


def top_tokens(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and ids (B, k) of the `k` most likely next tokens under (B, V) logits."""
    return F.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)


CLEAN_PATCHED = "clean||patched"
"""KL(M(A) || M(X)): the clean run's distribution against the patched one (eval, validation)."""
PATCHED_CLEAN = "patched||clean"
"""KL(M(X) || M(A)): the patched run's distribution against the clean one (training losses)."""
_DIRECTIONS = (CLEAN_PATCHED, PATCHED_CLEAN)


def patched_kl(
    orig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    A: torch.Tensor,
    patches: list[torch.Tensor],
    direction: Literal["clean||patched", "patched||clean"] = "clean||patched",
    return_clean: bool = False,
    top_k: int = 0,
):
    """KL of M's next-token distribution at P (the last column) between A and each X in `patches`.

    `orig` is the lens's `OriginalModelWrapper`; the clean prefix runs once and every vector set
    (A first) goes through one batched single-token pass. `direction="clean||patched"` gives
    per-sample KL(M(A) || M(X)) of shape (B,) (the eval's metric, no grad needed);
    `direction="patched||clean"` gives the training term KL(M(X) || M(A)), batchmean, with the
    gradient flowing through X. Any other direction is a ValueError.
    With `return_clean`, also returns M's clean logits (B, V) at P. With `top_k > 0`, also
    returns (last) the probabilities and ids (B, top_k) of M's most likely next tokens at P, from
    the same pass, for A first and then each X: `[(probs, ids), ...]`.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, not {direction!r}")
    vectors = (
        [A, *(x.to(A.dtype) for x in patches)] if direction == CLEAN_PATCHED else [A, *patches]
    )
    logits = orig.forward_with_replacement(input_ids, attention_mask, vectors)
    return _scores(logits, direction, return_clean, top_k)


def patched_kl_at(
    orig, prefix, positions: list[int], A: torch.Tensor, patches: list[torch.Tensor], top_k: int = 0
):
    """`patched_kl` (direction clean||patched) at `positions` of one text whose clean pass ran once
    (`orig.shared_prefix`): the same KL and top-k, from one token per position and vector set."""
    vectors = [A, *(x.to(A.dtype) for x in patches)]
    return _scores(
        orig.forward_at_positions(prefix, positions, vectors), CLEAN_PATCHED, False, top_k
    )


def patched_kl_after(
    orig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    next_ids: torch.Tensor,
    next_mask: torch.Tensor,
    A: torch.Tensor,
    patches: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Per-sample KL(M(A) || M(X)) after P, (B,) for each X in `patches` (no grad).

    X is written at P and M reads the true tokens `next_ids` after it
    (`orig.logits_after_replacement`); the KL is averaged over each row's real next tokens
    (`next_mask` 1), and a row with none scores 0.
    """
    clean, *others = orig.logits_after_replacement(
        input_ids, attention_mask, next_ids, next_mask, [A, *(x.to(A.dtype) for x in patches)]
    )
    weight = next_mask.to(device=clean.device, dtype=torch.float32)
    count = weight.sum(-1).clamp(min=1)
    flat = clean.flatten(0, 1)
    return [
        (kl_per_sample(flat, other.flatten(0, 1)).view(weight.shape) * weight).sum(-1) / count
        for other in others
    ]


def _scores(logits: list[torch.Tensor], direction: str, return_clean: bool, top_k: int):
    """The KLs (and clean logits, top-k) of `patched_kl` from M's logits for A and each X."""
    clean = logits[0]
    if direction == PATCHED_CLEAN:
        kls = [kl_at_p(other, clean) for other in logits[1:]]
    else:
        kls = [kl_per_sample(clean, other) for other in logits[1:]]
    out = (kls, clean) if return_clean else (kls,)
    if top_k > 0:
        out = (*out, [top_tokens(x.detach(), top_k) for x in logits])
    return out if len(out) > 1 else kls
