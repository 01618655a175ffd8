"""Metrics against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from consistency_lens.evaluation import metrics


def test_kl_matches_hand_computation():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    expected = 0.5 * math.log(2.0) + 0.25 * math.log(0.5)
    got = metrics.kl_per_sample(p.log(), q.log())
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Logits are shift-invariant; the argument order matters (KL is not symmetric).
    assert metrics.kl_per_sample(p.log() + 3.0, q.log()).item() == pytest.approx(expected, abs=1e-6)
    reverse = 0.25 * math.log(0.5) + 0.5 * math.log(2.0)
    assert metrics.kl_per_sample(q.log(), p.log()).item() == pytest.approx(reverse, abs=1e-6)
    assert metrics.kl_per_sample(p.log(), p.log()).item() == 0.0


def test_kl_recovered():
    lens = torch.tensor([1.0, 1.0])
    base = torch.tensor([3.0, 5.0])
    assert metrics.kl_recovered(lens, base) == pytest.approx(0.75)
    assert metrics.kl_recovered(base, base) == pytest.approx(0.0)
    assert math.isnan(metrics.kl_recovered(lens, torch.zeros(2)))


def test_reconstruction_metrics():
    A = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    A_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    # errors: (0, 1), (0, -2) -> squared sum 5 over 4 elements
    assert metrics.mse(A, A_hat) == pytest.approx(5 / 4)
    assert metrics.normalized_mse(A, A_hat) == pytest.approx(5 / (1 + 9 + 4))
    # mean (2, 1); deviations (-1,-1), (1,1) -> total 4
    assert metrics.fve(A, A_hat) == pytest.approx(1 - 5 / 4)
    assert metrics.fve(A, A) == pytest.approx(1.0)
    assert metrics.fve(A, A.mean(0, keepdim=True).expand_as(A)) == pytest.approx(0.0)
    cos = metrics.cosine_per_sample(A, A_hat)
    assert cos[0].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[1].item() == pytest.approx(9 / (math.sqrt(13) * 3))


def test_nll_and_perplexity():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    targets = torch.tensor([[0, 1]])
    nll = metrics.token_nll(logits, targets)
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert nll.item() == pytest.approx(expected, abs=1e-6)
    assert metrics.perplexity(nll) == pytest.approx(math.exp(expected), rel=1e-6)


def test_diversity():
    assert metrics.fraction_unique(["a", "a", "b", "c"]) == pytest.approx(0.75)
    assert metrics.fraction_unique(["x"] * 5) == pytest.approx(0.2)
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert metrics.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert metrics.distinct_n(seqs, 2) == pytest.approx(3 / 4)
    assert math.isnan(metrics.distinct_n([[1]], 2))


def test_bootstrap_is_seeded_and_covers_the_estimate():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=gen) + 2.0
    ci1 = metrics.mean_ci(values, resamples=300, seed=7)
    ci2 = metrics.mean_ci(values, resamples=300, seed=7)
    assert ci1 == ci2
    assert ci1[0] < values.mean().item() < ci1[1]
    # ~1.96 * sigma / sqrt(n) ≈ 0.14 half-width
    assert 0.05 < (ci1[1] - ci1[0]) / 2 < 0.3
    assert all(math.isnan(x) for x in metrics.mean_ci(values, resamples=0))


def test_kl_recovered_ci_is_paired():
    base = torch.linspace(1.0, 10.0, 50)
    lens = base * 0.5
    # Every resample keeps the exact 0.5 ratio only when lens and baseline are drawn together.
    lo, hi = metrics.kl_recovered_ci(lens, base, resamples=200, seed=1)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
