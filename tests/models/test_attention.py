"""Attention with a graph for some rows only (`models/attention.py`): the same values bit for bit,
gradients cut exactly where the caller says no loss reads, and the plan step unchanged by it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import objective_batch, objective_lens
from transformers import AttentionInterface

from consistency_lens.models.adapter import find_parts
from consistency_lens.models.attention import GRAD_ROWS, split_grad_rows
from consistency_lens.models.orig import _grad_rows
from consistency_lens.training.objectives.plan import compute_losses

SDPA = AttentionInterface()["sdpa"]


def _qkv(batch: int = 5, heads: int = 2, q_len: int = 3, kv_len: int = 7):
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, q_len, 8), (batch, heads, kv_len, 8), (batch, heads, kv_len, 8)]
    tensors = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    allowed = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed[0, :, :, :2] = False  # one row with padding: the mask is sliced with the rows
    return tensors, allowed


def test_the_registry_sdpa_is_wrapped_once():
    assert SDPA.inner is not None
    assert getattr(SDPA.inner, "inner", None) is None


@pytest.mark.parametrize("rows", [(0, 2), (2, 5), (1, 3), (0, 5)])
def test_rows_keep_their_values_and_only_grad_rows_their_gradient(rows):
    module = SimpleNamespace(is_causal=True)
    (q, k, v), mask = _qkv()
    # A per-row additive bias (T5-style models hand one to attention) is split with the rows.
    bias = torch.randn(5, 2, 3, 7, generator=torch.Generator().manual_seed(2))
    plain, _ = SDPA.inner(module, q, k, v, mask, position_bias=bias)
    split, weights = SDPA(module, q, k, v, mask, position_bias=bias, **{GRAD_ROWS: rows})
    assert weights is None
    assert torch.equal(split, plain)
    # A loss over every row: the split graph carries exactly the grad rows' part of it.
    weights_out = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    start, stop = rows
    expected = torch.autograd.grad((plain[start:stop] * weights_out[start:stop]).sum(), (q, k, v))
    got = torch.autograd.grad((split * weights_out).sum(), (q, k, v), allow_unused=True)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(g, e)
        assert torch.equal(g[:start], torch.zeros_like(g[:start]))
        assert torch.equal(g[stop:], torch.zeros_like(g[stop:]))
        assert g[start:stop].abs().sum() > 0


def test_without_grad_or_rows_the_wrapper_is_plain_sdpa():
    module = SimpleNamespace(is_causal=True)
    (q, k, v), mask = _qkv()
    calls = []

    def inner(*args, **kwargs):
        calls.append((args[1].shape[0], torch.is_grad_enabled(), kwargs))
        return SDPA.inner(*args, **kwargs)

    wrapped = split_grad_rows(inner)
    wrapped(module, q, k, v, mask)
    with torch.no_grad():
        wrapped(module, q, k, v, mask, **{GRAD_ROWS: (0, 2)})
    wrapped(module, q, k, v, mask, **{GRAD_ROWS: (0, 9)})  # out of range: nothing to split
    assert calls == [(5, True, {}), (5, False, {}), (5, True, {})]
    calls.clear()
    wrapped(module, q, k, v, mask, **{GRAD_ROWS: (1, 3)})
    assert calls == [(1, False, {}), (2, True, {}), (2, False, {})]


def test_m_names_the_rows_of_the_vector_sets_that_need_a_gradient():
    data, grad = torch.zeros(4, 3), torch.zeros(4, 3, requires_grad=True)
    assert _grad_rows([data, grad], 4) == (4, 8)
    assert _grad_rows([data, grad, grad], 4) == (4, 12)
    assert _grad_rows([grad, data], 4) == (0, 4)
    assert _grad_rows([grad, data, grad], 4) is None
    assert _grad_rows([grad, grad], 4) is None
    assert _grad_rows([data, data], 4) is None


def _step(lens, batch, split: bool, monkeypatch) -> tuple[torch.Tensor, list, list]:
    """Losses, parameter gradients and (batch, grad enabled) of every attention call."""
    calls = []

    def inner(*args, **kwargs):
        calls.append((args[1].shape[0], torch.is_grad_enabled()))
        return SDPA.inner(*args, **kwargs)

    monkeypatch.setitem(
        AttentionInterface._global_mapping, "sdpa", split_grad_rows(inner) if split else inner
    )
    lens.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = compute_losses(lens, batch, tau=1.0, alpha=1.0)
    out.loss.backward()
    losses = torch.stack([out.loss, out.loss_kl, out.loss_lm]).detach()
    grads = [p.grad for p in lens.parameters() if p.requires_grad]
    return losses, grads, calls


@pytest.mark.parametrize(
    "train",
    [
        {"mode": "frozen_base"},
        {"mode": "full"},
        {"mode": "full", "gradient_checkpointing": True},
        {"mode": "full", "entropy_weight": 0.1},
    ],
    ids=["frozen_base", "full", "checkpointed", "entropy"],
)
def test_plan_step_is_unchanged_and_a_prime_keeps_no_attention_graph(
    tiny_llama_dir, monkeypatch, train
):
    lens = objective_lens(tiny_llama_dir, **train)
    batch = objective_batch(lens)
    n = len(batch)
    losses, grads, plain_calls = _step(lens, batch, False, monkeypatch)
    split_losses, split_grads, calls = _step(lens, batch, True, monkeypatch)
    assert torch.equal(split_losses, losses)
    assert len(grads) == len(split_grads) and all(g is not None for g in grads)
    for g, s in zip(grads, split_grads, strict=True):
        assert torch.equal(s, g)
    graphed = [rows for rows, grad in calls if grad]
    whole = [rows for rows, grad in plain_calls if grad].count(2 * n)
    if "entropy_weight" in train:
        # The entropy reads A''s logits too: D and E keep every row's graph; M's pass over
        # [A; A_target] (one call per block) still leaves A's rows out.
        assert graphed.count(2 * n) == whole - len(find_parts(lens.orig.model).blocks)
        return
    # D's prompt before the slot (batch 1) and M's own rows aside, attention with a graph ran on
    # A's n rows only: D's chunk after the slot and its tokens, E, and M's A_target pass.
    assert 2 * n in [rows for rows, grad in plain_calls if grad]
    assert 2 * n not in graphed
    assert graphed.count(n) == len(graphed) - graphed.count(1)
    assert any(rows == n and not grad for rows, grad in calls)
