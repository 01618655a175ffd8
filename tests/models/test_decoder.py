"""Decoder D: KV-cached soft generation equals a full forward, STE one-hots, gradients, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import decoder_full_forward

from consistency_lens.errors import LensError
from consistency_lens.models.decoder import DecoderModel, prompt_token_ids
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper
from consistency_lens.models.projection import embedding_norm

PROMPT = "the nation <embed> law tax"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    loaded = load_model(str(path), device="cpu", dtype="float32")
    orig = OriginalModelWrapper(loaded, layer=1)
    ids = torch.randint(1, 320, (3, 9), generator=torch.Generator().manual_seed(0))
    acts = orig.activations(ids, torch.ones_like(ids))
    return loaded, acts


def _decoder(loaded, scale=1.0, **kw) -> DecoderModel:
    return DecoderModel(loaded.model, loaded.tokenizer, PROMPT, loaded.parts.d_model, scale, **kw)


def test_soft_generation_matches_uncached_forward(setup):
    loaded, acts = setup
    dec = _decoder(loaded)
    torch.manual_seed(0)
    gen = dec.generate_soft(acts, max_length=5, tau=1.0)
    assert gen.token_logits.shape == (3, 5, 320)
    assert gen.discrete_token_ids.shape == (3, 5)
    onehot = torch.nn.functional.one_hot(gen.discrete_token_ids, 320).float()
    torch.testing.assert_close(gen.ste_onehots.detach(), onehot)
    expected = decoder_full_forward(dec, loaded, PROMPT, acts, gen.discrete_token_ids)
    torch.testing.assert_close(gen.token_logits.detach(), expected, atol=1e-4, rtol=1e-4)


def test_greedy_generate_is_argmax_of_full_forward(setup):
    loaded, acts = setup
    dec = _decoder(loaded)
    ids = dec.generate(acts, max_length=4)
    logits = decoder_full_forward(dec, loaded, PROMPT, acts, ids)
    assert torch.equal(logits.argmax(-1), ids)
    torch.manual_seed(3)
    sampled = dec.generate(acts, max_length=4, greedy=False, temperature=2.0)
    assert sampled.shape == (3, 4)


def test_gradient_reaches_projection_through_the_kv_cache(setup):
    loaded, acts = setup
    dec = _decoder(loaded)
    gen = dec.generate_soft(acts, max_length=4, tau=1.0)
    # Only the last token's one-hot enters the loss: A reaches it only through the cache.
    weights = torch.randn(320, generator=torch.Generator().manual_seed(1))
    (gen.ste_onehots[:, -1] @ weights).sum().backward()
    assert dec.proj.weight.grad.abs().sum() > 0
    assert dec.prompt_left.grad.abs().sum() > 0
    assert dec.prompt_right.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.model.parameters())


def test_gradient_checkpointing_gives_same_gradients(setup):
    loaded, acts = setup
    grads = []
    for ckpt in (False, True):
        dec = _decoder(loaded, gradient_checkpointing=ckpt)
        torch.manual_seed(5)
        gen = dec.generate_soft(acts, max_length=3, tau=0.7)
        (gen.token_logits.square().mean() + gen.ste_onehots[:, -1, :7].sum()).backward()
        grads.append(dec.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_projection_is_scaled_identity_matching_embedding_norm(setup):
    loaded, acts = setup
    scale = embedding_norm(loaded.parts) / float(acts.norm(dim=-1).median())
    dec = _decoder(loaded, scale=scale)
    torch.testing.assert_close(dec.proj.weight, torch.eye(loaded.parts.d_model) * scale)
    projected = dec.proj(acts).detach().norm(dim=-1).median()
    assert 0.5 < float(projected) / embedding_norm(loaded.parts) < 2.0


def test_prompt_needs_one_embed_slot(setup):
    loaded, _ = setup
    with pytest.raises(LensError, match="<embed>"):
        DecoderModel(loaded.model, loaded.tokenizer, "no slot here", 64, 1.0)
    with pytest.raises(LensError, match="shape"):
        _decoder(loaded).generate(torch.zeros(2, 65), 3)


def test_prompt_with_nothing_around_the_slot_builds_and_generates(tiny_gpt2_dir):
    """GPT-2 adds no BOS, so `<embed>` alone leaves both prompt sides empty."""
    from consistency_lens.config import LensConfig
    from consistency_lens.models.lens import ConsistencyLens

    cfg = LensConfig(
        model=str(tiny_gpt2_dir),
        device="cpu",
        model_dtype="float32",
        layer=1,
        train={"t_text": 2, "prompt": "<embed>"},
    )
    lens = ConsistencyLens.build(cfg)
    assert lens.decoder.prompt_left.shape[0] == 0 and lens.decoder.prompt_right.shape[0] == 0
    ids, a_hat = lens.reconstruct(torch.randn(3, lens.d_model))
    assert ids.shape == (3, 2) and a_hat.shape == (3, lens.d_model)


def test_injection_at_layer_l_puts_a_exactly_in_the_slot_state(setup):
    """Identity projection, k = L: D's state at the placeholder after block L is A, bit for bit."""
    from consistency_lens.models.hooks import run_until

    loaded, acts = setup
    dec = _decoder(loaded, inject_layer=1)
    torch.testing.assert_close(dec.proj.weight, torch.eye(loaded.parts.d_model), rtol=0, atol=0)
    seen = []

    def read_input(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    # What block L+1 reads is block L's output after the injection hook has run.
    handle = loaded.parts.blocks[2].register_forward_pre_hook(read_input, with_kwargs=True)
    try:
        dec.generate(acts, max_length=1)
    finally:
        handle.remove()
    left, _ = prompt_token_ids(loaded.tokenizer, PROMPT)
    # seen[0] is the shared left prompt; seen[1] the slot (index 0) and the right prompt.
    assert len(seen) == 2 and seen[0].shape[1] == len(left)
    assert torch.equal(seen[1][:, 0], acts)
    # And block L+1 of D really reads it: a different A changes D's next state.
    other = run_until(loaded.model, loaded.parts.blocks[1], inputs_embeds=dec.slot[None])[:, -1]
    assert not torch.equal(other.expand_as(acts), acts)


@pytest.mark.parametrize("ckpt", [False, True])
def test_injected_generation_matches_uncached_forward_and_gets_gradients(setup, ckpt):
    loaded, acts = setup
    dec = _decoder(loaded, scale=0.7, inject_layer=0, gradient_checkpointing=ckpt)
    torch.manual_seed(0)
    gen = dec.generate_soft(acts, max_length=4, tau=1.0)
    expected = decoder_full_forward(dec, loaded, PROMPT, acts, gen.discrete_token_ids)
    torch.testing.assert_close(gen.token_logits.detach(), expected.detach(), atol=1e-4, rtol=1e-4)
    # A is no input embedding here: it reaches the text only through block 0's hook.
    (
        gen.ste_onehots[:, -1] @ torch.randn(320, generator=torch.Generator().manual_seed(1))
    ).sum().backward()
    assert dec.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.model.parameters())


@pytest.mark.parametrize("inject_layer", [None, 1])
def test_teacher_forced_logits_equal_cached_generation(setup, inject_layer):
    loaded, acts = setup
    dec = _decoder(loaded, inject_layer=inject_layer)
    ids = dec.generate(acts, max_length=4)
    forced = dec.teacher_forced_logits(acts, ids)
    assert forced.shape == (3, 4, 320)
    assert torch.equal(forced.argmax(-1), ids)
    gen_one = dec.teacher_forced_logits(acts, ids[:, :1])
    torch.testing.assert_close(gen_one, forced[:, :1], atol=1e-5, rtol=1e-5)


def test_inject_layer_out_of_range_is_refused(setup):
    loaded, _ = setup
    with pytest.raises(LensError, match="inject_layer"):
        _decoder(loaded, inject_layer=99)


def test_gumbel_softmax_hard_draws_tokens_at_softmax_frequencies():
    """Hard samples follow softmax(logits) whatever tau (argmax of logits + noise); the one-hots
    are exact, ids are their argmax, and the gradient is the soft distribution's."""
    from consistency_lens.models.decoder import gumbel_softmax_hard

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    n = 40_000
    for tau in (1.0, 0.5):
        onehots, ids = gumbel_softmax_hard(logits.expand(n, -1), tau)
        assert torch.equal(onehots.detach().argmax(-1), ids)
        assert torch.equal(onehots.detach(), F.one_hot(ids, 4).float())
        freq = torch.bincount(ids, minlength=4).float() / n
        expected = F.softmax(logits, dim=-1)
        # Binomial standard error is at most 0.0025 at n = 40,000: 4 sigma.
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_gumbel_softmax_hard_is_the_straight_through_estimator(monkeypatch):
    """With the noise g fixed: the forward is the one-hot of argmax(logits + g), the gradient is
    softmax((logits + g) / tau)'s, tau included."""
    from consistency_lens.models import decoder

    g = torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.5, 0.0, -0.4, 0.2]])
    monkeypatch.setattr(decoder, "gumbel_noise", lambda like: g)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.9, 0.3, -2.0]], requires_grad=True)
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.2, 1.0, -1.0, 0.7]])
    onehots, ids = decoder.gumbel_softmax_hard(logits, 0.7)
    assert torch.equal(ids, torch.tensor([0, 0]))
    assert torch.equal(onehots.detach(), F.one_hot(ids, 4).float())
    (grad,) = torch.autograd.grad((onehots * weights).sum(), logits)
    soft = F.softmax((logits + g) / 0.7, dim=-1)
    (expected,) = torch.autograd.grad((soft * weights).sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-7)


def test_gumbel_noise_is_standard_gumbel_and_never_nan():
    from consistency_lens.models.decoder import gumbel_noise

    torch.manual_seed(0)
    g = gumbel_noise(torch.empty(200_000))
    assert not torch.isnan(g).any() and not (g == float("inf")).any()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(float(g.mean()) - 0.5772) < 0.01
    assert abs(float(g.var()) - torch.pi**2 / 6) < 0.03


def test_sample_ids_draws_at_softmax_of_logits_over_temperature():
    from consistency_lens.models.decoder import sample_ids

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    n = 40_000
    for temperature in (1.0, 2.0):
        ids = sample_ids(logits.expand(n, -1), temperature)
        freq = torch.bincount(ids, minlength=4).float() / n
        # Binomial standard error is at most 0.0025 at n = 40,000: 4 sigma.
        torch.testing.assert_close(freq, F.softmax(logits / temperature, -1), atol=0.01, rtol=0)


def test_the_prompt_pass_before_the_slot_computes_no_logits(setup):
    """D's batch-1 pass over the prompt before the slot runs for its kv cache only."""
    loaded, acts = setup
    dec = _decoder(loaded)
    rows = []
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(tuple(args[0].shape)))
    try:
        dec.generate_soft(acts, max_length=2, tau=1.0)
    finally:
        handle.remove()
    d = loaded.parts.d_model
    assert rows == [(1, 0, d), (3, 1, d), (3, 1, d)]


def test_rotated_decoder_writes_the_last_tokens_first_and_gives_reading_order(setup):
    """`rotate=k`: D writes the text's last k tokens first; `generate` returns the text in reading
    order (its written order with the first k moved to the end), greedy and sampled alike, and
    `teacher_forced_logits` scores a reading-order text as D writes it, column t for token t."""
    loaded, acts = setup
    plain = _decoder(loaded, inject_layer=1)
    rot = _decoder(loaded, inject_layer=1, rotate=2)
    rot.load_state_dict(plain.state_dict())
    written = plain.generate(acts, max_length=5)
    text = rot.generate(acts, max_length=5)
    assert torch.equal(text, torch.cat([written[:, 2:], written[:, :2]], 1))
    torch.manual_seed(5)
    sampled_written = plain.generate(acts, max_length=5, greedy=False, temperature=2.0)
    torch.manual_seed(5)
    sampled_text = rot.generate(acts, max_length=5, greedy=False, temperature=2.0)
    assert torch.equal(sampled_text, torch.cat([sampled_written[:, 2:], sampled_written[:, :2]], 1))
    assert not torch.equal(sampled_text, sampled_written)
    forced = rot.teacher_forced_logits(acts, text)
    assert torch.equal(forced.argmax(-1), text)
    torch.testing.assert_close(forced, plain.teacher_forced_logits(acts, written).roll(-2, 1))
    with pytest.raises(LensError, match="train.decoder_rotate=2"):
        rot.generate_soft(acts, max_length=5, tau=1.0)


@pytest.mark.parametrize("inject_layer", [None, 1])
@pytest.mark.parametrize("rotate", [0, 2])
def test_texts_written_from_rows_equal_texts_written_from_repeated_activations(
    setup, inject_layer, rotate
):
    """`rows`: the prompt and A run once per activation and each text continues over its row's
    cache; the texts, D's log-probabilities, the teacher-forced logits and their gradients are
    those of the activations repeated (`activations[rows]`), for both layouts the callers use."""
    loaded, acts = setup
    dec = _decoder(loaded, inject_layer=inject_layer, rotate=rotate)
    for rows in (torch.arange(3).repeat(2), torch.arange(3).repeat_interleave(2)):
        ids, logprob = dec.write(acts[rows], 4, lambda t, logits: logits.argmax(-1))
        shared_ids, shared_logprob = dec.write(acts, 4, lambda t, logits: logits.argmax(-1), rows)
        assert torch.equal(shared_ids, ids)
        torch.testing.assert_close(shared_logprob, logprob, atol=1e-5, rtol=1e-5)
        torch.manual_seed(7)
        sampled = dec.generate(acts[rows], 4, greedy=False, temperature=2.0)
        torch.manual_seed(7)
        assert torch.equal(dec.generate(acts, 4, greedy=False, temperature=2.0, rows=rows), sampled)
        for length in (1, 2, 4):
            grads = []
            for forced in (
                dec.teacher_forced_logits(acts[rows], sampled[:, :length]),
                dec.teacher_forced_logits(acts, sampled[:, :length], rows),
            ):
                assert forced.shape == (6, length, 320)
                dec.zero_grad()
                (forced * torch.linspace(-1, 1, 320)).sum().backward()
                grads.append((forced.detach(), dec.proj.weight.grad.clone()))
            torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-4)
            assert grads[0][1].abs().sum() > 0
