"""Attention with a graph for some rows only (`models/attention.py`): the same values bit for bit,
gradients cut exactly where the caller says no loss reads, and the plan step unchanged by it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import objective_batch, record_sdpa
from transformers import AttentionInterface

from consistency_lens.config import LensConfig
from consistency_lens.models import attention
from consistency_lens.models.adapter import find_parts
from consistency_lens.models.attention import GRAD_ROWS, grad_rows_kwargs, split_grad_rows
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.orig import _grad_rows
from consistency_lens.training.objectives.plan import compute_losses

SDPA = AttentionInterface()["sdpa"]


def _qkv(q_heads: int, kv_heads: int, q_len: int, batch: int = 5, kv_len: int = 7):
    gen = torch.Generator().manual_seed(0)
    shapes = [
        (batch, q_heads, q_len, 8),
        (batch, kv_heads, kv_len, 8),
        (batch, kv_heads, kv_len, 8),
    ]
    tensors = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    allowed = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed[0, :, :, :2] = False  # one row with padding: the mask is sliced with the rows
    return tensors, allowed


def test_the_registry_sdpa_is_wrapped_once():
    assert SDPA.inner is not None
    assert getattr(SDPA.inner, "inner", None) is None


@pytest.mark.parametrize("rows", [(0, 2), (2, 5), (1, 3), (0, 5)])
@pytest.mark.parametrize(
    "heads",
    [(2, 2, 3), (4, 2, 3), (4, 2, 1)],
    ids=["mha", "gqa-repeated", "gqa-packed-one-query"],
)
def test_rows_keep_their_values_and_only_grad_rows_their_gradient(rows, heads):
    q_heads, kv_heads, q_len = heads
    module = SimpleNamespace(is_causal=True, num_key_value_groups=q_heads // kv_heads)
    (q, k, v), mask = _qkv(q_heads, kv_heads, q_len)
    plain, _ = SDPA.inner(module, q, k, v, mask)
    split, weights = SDPA(module, q, k, v, mask, **{GRAD_ROWS: rows})
    assert weights is None
    assert torch.equal(split, plain)
    # A loss over every row: the split graph carries exactly the grad rows' part of it.
    weights_out = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    start, stop = rows
    expected = torch.autograd.grad((plain[start:stop] * weights_out[start:stop]).sum(), (q, k, v))
    got = torch.autograd.grad((split * weights_out).sum(), (q, k, v))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(g, e)
        assert torch.equal(g[:start], torch.zeros_like(g[:start]))
        assert torch.equal(g[stop:], torch.zeros_like(g[stop:]))
        assert g[start:stop].abs().sum() > 0


def test_the_wrapper_is_plain_sdpa_where_no_row_needs_a_graph():
    module = SimpleNamespace(is_causal=True)
    (q, k, v), mask = _qkv(2, 2, 3)
    calls = []

    def inner(*args, **kwargs):
        calls.append((args[1].shape[0], torch.is_grad_enabled(), kwargs))
        return SDPA.inner(*args, **kwargs)

    wrapped = split_grad_rows(inner)
    wrapped(module, q, k, v, mask)
    with torch.no_grad():
        wrapped(module, q, k, v, mask, **{GRAD_ROWS: (0, 2)})
    data = [t.detach() for t in (q, k, v)]  # e.g. M's blocks below the patched layer
    wrapped(module, *data, mask, **{GRAD_ROWS: (0, 2)})
    assert calls == [(5, True, {}), (5, False, {}), (5, True, {})]
    calls.clear()
    wrapped(module, q, k, v, mask, **{GRAD_ROWS: (1, 3)})
    assert calls == [(1, False, {}), (2, True, {}), (2, False, {})]
    with pytest.raises(ValueError, match="must name rows of the batch of 5"):
        wrapped(module, q, k, v, mask, **{GRAD_ROWS: (0, 9)})


def test_the_keyword_goes_to_sdpa_models_only():
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    eager = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"))
    assert grad_rows_kwargs(sdpa, (0, 4)) == {GRAD_ROWS: (0, 4)}
    assert grad_rows_kwargs(eager, (0, 4)) == {}
    assert grad_rows_kwargs(sdpa, None) == {}
    with torch.no_grad():
        assert grad_rows_kwargs(sdpa, (0, 4)) == {}


def test_no_split_on_a_device_where_it_does_not_pay(monkeypatch):
    """A GPU's attention kernel takes all rows at once: there the split would only add launches."""
    module = SimpleNamespace(is_causal=True)
    (q, k, v), mask = _qkv(2, 2, 3)
    calls = []

    def inner(*args, **kwargs):
        calls.append(args[1].shape[0])
        return SDPA.inner(*args, **kwargs)

    monkeypatch.setattr(attention, "SPLIT_DEVICES", frozenset({"cuda"}))
    split_grad_rows(inner)(module, q, k, v, mask, **{GRAD_ROWS: (1, 3)})
    assert calls == [5]


def test_m_names_the_rows_of_the_vector_sets_that_need_a_gradient():
    data, grad = torch.zeros(4, 3), torch.zeros(4, 3, requires_grad=True)
    assert _grad_rows([data, grad], 4) == (4, 8)
    assert _grad_rows([data, grad, grad], 4) == (4, 12)
    assert _grad_rows([grad, data], 4) == (0, 4)
    assert _grad_rows([grad, data, grad], 4) is None
    assert _grad_rows([grad, grad], 4) is None
    assert _grad_rows([data, data], 4) is None


def _step(lens, batch, split: bool, monkeypatch) -> tuple[torch.Tensor, list, list]:
    """Losses, parameter gradients and (batch, builds a graph) of every attention call."""
    calls = record_sdpa(monkeypatch, split)
    lens.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = compute_losses(lens, batch, tau=1.0, alpha=1.0)
    out.loss.backward()
    losses = torch.stack([out.loss, out.loss_kl, out.loss_lm]).detach()
    grads = [p.grad for p in lens.parameters() if p.requires_grad]
    return losses, grads, calls


@pytest.mark.parametrize(
    "case",
    [
        ("llama", "float32", {"mode": "frozen_base"}),
        ("llama", "bfloat16", {"mode": "frozen_base"}),
        ("llama", "float32", {"mode": "full"}),
        ("llama", "float32", {"mode": "full", "gradient_checkpointing": True}),
        ("llama", "float32", {"mode": "full", "entropy_weight": 0.1}),
        ("gpt2", "float32", {"mode": "full"}),
    ],
    ids=["frozen_base", "frozen_base-bf16", "full", "checkpointed", "entropy", "gpt2"],
)
def test_plan_step_is_unchanged_and_a_prime_keeps_no_attention_graph(
    tiny_llama_dir, tiny_gpt2_dir, monkeypatch, case, one_intra_op_thread, padded_passes
):
    # `padded_passes`: M's padded pass, where the split runs (a packed pass has one row).
    family, dtype, train = case
    model = tiny_llama_dir if family == "llama" else tiny_gpt2_dir
    cfg = LensConfig(
        model=str(model), device="cpu", model_dtype=dtype, layer=1, train={"t_text": 3, **train}
    )
    lens = ConsistencyLens.build(cfg)
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
    assert whole > 0
    if "entropy_weight" in train:
        # The entropy reads A''s logits too: D and E keep every row's graph; M's pass over
        # [A; A_target] (one call per block above the patched one) leaves A's rows out.
        above = len(find_parts(lens.orig.model).blocks) - cfg.layer - 1
        assert graphed.count(2 * n) == whole - above
        return
    # D's prompt before the slot (batch 1) aside, attention with a graph ran on n rows only: A's
    # in D's chunk after the slot, its tokens and E, A_target's in M's pass.
    assert 2 * n not in graphed
    assert graphed.count(n) == len(graphed) - graphed.count(1)
    assert any(rows == n and not grad for rows, grad in calls)
