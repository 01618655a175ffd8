"""The objective of docs/design.md section 2: hand-computed KL terms, alignment, gradient paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import objective_batch, objective_lens

from consistency_lens.errors import LensError
from consistency_lens.models.adapter import find_parts
from consistency_lens.models.patching import kl_at_p, patched_kl
from consistency_lens.training.objectives.plan import compute_losses, lm_loss


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


def _hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q), averaged over rows."""
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def test_kl_helpers_against_hand_computation():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 11, generator=gen), torch.randn(4, 11, generator=gen)
    torch.testing.assert_close(kl_at_p(p, q), _hand_kl(p, q))
    assert not torch.allclose(kl_at_p(p, q), _hand_kl(q, p))
    # lm_loss pairs D's logits for token t+1 with M's logits at t.
    orig = torch.randn(2, 5, 11, generator=gen)
    token = torch.randn(2, 5, 11, generator=gen)
    expected = _hand_kl(orig[:, :-1].reshape(-1, 11), token[:, 1:].reshape(-1, 11))
    torch.testing.assert_close(lm_loss(token, orig), expected)
    # M's logits for the last token are never read: M may skip reading it.
    assert torch.equal(lm_loss(token, orig[:, :-1]), lm_loss(token, orig))
    shifted = torch.cat([torch.randn(2, 1, 11, generator=gen), orig[:, :-1]], dim=1)
    assert float(lm_loss(shifted, orig)) < 1e-6
    assert float(lm_loss(orig, orig)) > 1e-3
    assert float(lm_loss(token[:, :1], orig[:, :1])) == 0.0


class _FixedLogits:
    """An `orig` whose patched pass gives fixed logits: row 0 for A (clean), then one per X."""

    def __init__(self, logits: list[torch.Tensor]):
        self.logits = logits

    def forward_with_replacement(self, input_ids, attention_mask, vectors):
        return self.logits[: len(vectors)]


def test_patched_kl_directions_name_their_kl():
    gen = torch.Generator().manual_seed(1)
    clean, patched = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    orig, ids, A = _FixedLogits([clean, patched]), torch.zeros(3, 2), torch.zeros(3, 4)
    (per_sample,) = patched_kl(orig, ids, ids, A, [A], direction="clean||patched")
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), _hand_kl(clean, patched))
    (batchmean,) = patched_kl(orig, ids, ids, A, [A], direction="patched||clean")
    torch.testing.assert_close(batchmean, _hand_kl(patched, clean))
    with pytest.raises(ValueError, match="direction"):
        patched_kl(orig, ids, ids, A, [A], direction="plan")


def test_losses_match_hand_computation(model_dir, monkeypatch):
    lens = objective_lens(model_dir, mse_weight=0.3, entropy_weight=0.05)
    batch = objective_batch(lens)
    seen: dict = {}
    gen_soft, replace = lens.decoder.generate_soft, lens.orig.forward_with_replacement

    def spy_gen(*args, **kw):
        seen["gen"] = gen_soft(*args, **kw)
        return seen["gen"]

    def spy_replace(ids, mask, vectors):
        seen["vectors"] = vectors
        seen["logits"] = replace(ids, mask, vectors)
        return seen["logits"]

    monkeypatch.setattr(lens.decoder, "generate_soft", spy_gen)
    monkeypatch.setattr(lens.orig, "forward_with_replacement", spy_replace)
    torch.manual_seed(0)
    out = compute_losses(lens, batch, tau=1.0, alpha=0.7)
    n = len(batch)
    gen = seen["gen"]
    assert gen.token_logits.shape[0] == 2 * n  # A and A' generated in one batched call
    a, a_target = seen["vectors"]
    assert torch.equal(a, batch.A)
    a_hat_prime = lens.encoder(gen.ste_onehots[n:]).detach()
    torch.testing.assert_close(a_target.detach(), out.a_hat + batch.A_prime - a_hat_prime)
    # Patched logits are the plan's M(A) and M(A_target), checked against the naive path.
    naive = lens.orig.naive_forward_with_replacement(
        batch.input_ids_A, batch.attention_mask_A, [a, a_target.detach()]
    )
    logits_a, logits_target = naive
    torch.testing.assert_close(seen["logits"][0], logits_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss_kl, _hand_kl(logits_target, logits_a), atol=1e-6, rtol=1e-5)
    # loss_lm: M reads D's discrete text; D's logits that produced token t+1 vs M's logits at t.
    ids = gen.discrete_token_ids[:n]
    m_logits = lens.orig.model(input_ids=ids).logits
    d_logits = gen.token_logits[:n]
    expected_lm = _hand_kl(m_logits[:, :-1].reshape(-1, 320), d_logits[:, 1:].reshape(-1, 320))
    torch.testing.assert_close(out.loss_lm, expected_lm, atol=1e-6, rtol=1e-5)
    scale = batch.A.norm(dim=-1).mean()
    mse = F.mse_loss(out.a_hat / scale, batch.A / scale)
    torch.testing.assert_close(out.loss_mse.detach(), mse)
    total = out.loss_lm + 0.7 * out.loss_kl + 0.3 * out.loss_mse - 0.05 * out.entropy
    torch.testing.assert_close(out.loss, total)


def test_loss_kl_is_the_patched_distribution_against_the_clean_one(tiny_llama_dir, monkeypatch):
    """KL(M(A_target) || M(A)), not the reverse. The random fixture's near-uniform head makes the
    two directions differ by less than fp32 rounding; with a peaked head and E writing a far
    vector they differ by 100x the tolerance, so the order of the arguments is pinned."""
    lens = objective_lens(tiny_llama_dir, target="direct")
    with torch.no_grad():  # a peaked head: the random fixture's near-uniform one is symmetric
        lens.orig.model.get_output_embeddings().weight.mul_(30)
    far = 8 * torch.randn(3, lens.d_model, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(lens.encoder, "forward", lambda *args, **kw: far)
    seen: dict = {}
    replace = lens.orig.forward_with_replacement

    def spy_replace(ids, mask, vectors):
        seen["logits"] = replace(ids, mask, vectors)
        return seen["logits"]

    monkeypatch.setattr(lens.orig, "forward_with_replacement", spy_replace)
    torch.manual_seed(0)
    out = compute_losses(lens, objective_batch(lens), tau=1.0, alpha=1.0)
    clean, patched = (x.double() for x in seen["logits"])
    forward, reverse = float(_hand_kl(patched, clean)), float(_hand_kl(clean, patched))
    # fp32 against the float64 hand value: ~1e-7 relative; the reverse is 7e-3 away (KL ~15).
    assert float(out.loss_kl) == pytest.approx(forward, rel=1e-5)
    assert abs(forward - reverse) > 100 * 1e-5 * forward


def test_loss_lm_is_zero_for_one_token(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir, t_text=1)
    out = compute_losses(lens, objective_batch(lens), tau=1.0, alpha=1.0)
    assert float(out.loss_lm) == 0.0
    out.loss.backward()
    assert lens.decoder.proj.weight.grad.abs().sum() > 0


def test_kl_gradients_reach_d_e_and_projection_never_m(model_dir):
    lens = objective_lens(model_dir, mode="full")
    out = compute_losses(lens, objective_batch(lens), tau=1.0, alpha=1.0)
    out.loss_kl.backward()
    e_blocks = find_parts(lens.encoder.model).blocks
    d_blocks = find_parts(lens.decoder.model).blocks
    assert lens.encoder.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in e_blocks[0].parameters())
    assert lens.decoder.proj.weight.grad.abs().sum() > 0
    # D's blocks get gradient through the STE one-hots and the KV cache.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d_blocks[0].parameters())
    assert all(p.grad is None for p in lens.orig.model.parameters())


def test_a_prime_residual_carries_no_gradient(tiny_llama_dir, monkeypatch):
    lens = objective_lens(tiny_llama_dir)
    batch = objective_batch(lens)
    encode = lens.encoder.forward
    kept: dict = {}

    def spy(onehots, ids=None, **kw):
        kept["a_hat_all"] = encode(onehots, ids, **kw)
        kept["a_hat_all"].retain_grad()
        return kept["a_hat_all"]

    monkeypatch.setattr(lens.encoder, "forward", spy)
    compute_losses(lens, batch, tau=1.0, alpha=1.0).loss_kl.backward()
    grad = kept["a_hat_all"].grad
    n = len(batch)
    assert grad[:n].abs().sum() > 0
    assert torch.equal(grad[n:], torch.zeros_like(grad[n:]))


def test_direct_target_skips_a_prime(tiny_llama_dir, monkeypatch):
    lens = objective_lens(tiny_llama_dir, target="direct")
    batch = objective_batch(lens)
    seen = {}
    replace = lens.orig.forward_with_replacement

    def spy(ids, mask, vectors):
        seen["vectors"] = vectors
        return replace(ids, mask, vectors)

    monkeypatch.setattr(lens.orig, "forward_with_replacement", spy)
    out = compute_losses(lens, batch, tau=1.0, alpha=1.0)
    torch.testing.assert_close(seen["vectors"][1].detach(), out.a_hat)


def test_width_mismatch_is_refused(tiny_llama_dir):
    lens = objective_lens(tiny_llama_dir)
    batch = objective_batch(lens)
    batch.A = torch.zeros(len(batch), 32)
    with pytest.raises(LensError, match="width 32"):
        compute_losses(lens, batch, tau=1.0, alpha=1.0)
