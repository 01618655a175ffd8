"""Pure tensor metrics of a lens: KL, reconstruction quality, fluency, diversity, bootstrap CIs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Re-exported: the per-sample KL and the reconstruction errors that training validates with live
# beside the patching helper that every KL path goes through.
from consistency_lens.models.patching import fve, kl_per_sample, mse, token_nll  # noqa: F401


def kl_recovered(kl_lens: torch.Tensor, kl_baseline: torch.Tensor) -> float:
    """`1 - mean(KL_lens) / mean(KL_baseline)`: 1 is perfect, 0 is no better than the baseline."""
    denom = kl_baseline.float().mean()
    if denom <= 0:
        return float("nan")
    return float(1.0 - kl_lens.float().mean() / denom)


def normalized_mse(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """`sum ||A - Â||² / sum ||A||²`: error relative to the activations' own energy."""
    A = A.float()
    return float(((A - A_hat.float()) ** 2).sum() / (A**2).sum().clamp(min=1e-12))


def cosine_per_sample(A: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between matching rows of (B, d) tensors."""
    return F.cosine_similarity(A.float(), A_hat.float(), dim=-1)


def perplexity(nll_per_sample: torch.Tensor) -> float:
    """Perplexity `exp(mean NLL)` over samples of equal token count."""
    return float(torch.exp(nll_per_sample.float().mean()))


def fraction_unique(texts: Sequence[str]) -> float:
    """Share of distinct strings among `texts` (1/N means every text is the same: mode collapse)."""
    return len(set(texts)) / len(texts) if texts else float("nan")


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams over total n-grams, pooled over all sequences."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def bootstrap_ci(
    statistic: Callable[..., float],
    *samples: torch.Tensor,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(*samples)`, resampling rows jointly (paired), seeded."""
    n = samples[0].shape[0]
    if resamples <= 0 or n == 0:
        return (float("nan"), float("nan"))
    gen = torch.Generator().manual_seed(seed)
    values = torch.empty(resamples, dtype=torch.float64)
    for r in range(resamples):
        idx = torch.randint(0, n, (n,), generator=gen)
        values[r] = statistic(*(s[idx] for s in samples))
    tail = (1.0 - level) / 2
    # A resample where the statistic is undefined (e.g. a ratio whose denominator drew only
    # zeros) is dropped rather than turning the whole interval into NaN.
    lo, hi = torch.nanquantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return (float(lo), float(hi))


def mean_ci(values: torch.Tensor, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of the mean of a 1-D tensor."""
    return bootstrap_ci(lambda v: float(v.float().mean()), values, resamples=resamples, seed=seed)


def kl_recovered_ci(
    kl_lens: torch.Tensor, kl_baseline: torch.Tensor, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Paired bootstrap CI of `kl_recovered` (same samples drawn for lens and baseline)."""
    return bootstrap_ci(kl_recovered, kl_lens, kl_baseline, resamples=resamples, seed=seed)
