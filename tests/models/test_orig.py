"""The frozen-model wrapper: clean replacement is a no-op, cheap path == naive path, padding-free."""

from __future__ import annotations

import pytest
import torch
from conftest import no_host_reads

from consistency_lens.errors import LensError
from consistency_lens.models.hooks import replace_at
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper, load_8bit


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def orig(request, tiny_llama_dir, tiny_gpt2_dir) -> OriginalModelWrapper:
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    loaded = load_model(str(path), device="cpu", dtype="float32")
    return OriginalModelWrapper(loaded, layer=1)


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 320, (n,), generator=gen) for n in lengths]
    return left_pad(seqs, pad_id=0)


def test_clean_activation_reproduces_clean_logits(orig):
    ids, mask = _batch([7, 12, 3, 1])
    clean = orig.clean_logits(ids, mask)
    a = orig.activations(ids, mask)
    (patched,) = orig.forward_with_replacement(ids, mask, [a])
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=1e-5)
    other = orig.forward_with_replacement(ids, mask, [a + torch.randn_like(a)])[0]
    assert (other - clean).abs().max() > 1e-2


def test_cheap_equals_naive(orig):
    ids, mask = _batch([9, 5, 14])
    a = orig.activations(ids, mask)
    vectors = [a + 0.5 * torch.randn_like(a), torch.randn_like(a)]
    cheap = orig.forward_with_replacement(ids, mask, vectors)
    naive = orig.naive_forward_with_replacement(ids, mask, vectors)
    for c, n in zip(cheap, naive, strict=True):
        torch.testing.assert_close(c, n, atol=1e-5, rtol=1e-5)


def test_one_shared_prefix_equals_the_naive_forward_at_every_position(orig):
    """`forward_at_positions` (one clean pass of the text, one token per position) gives what a
    full forward over 0..P with the replacement gives, at any positions, first and last too."""
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(1, 320, (1, 13), generator=gen)
    prefix = orig.shared_prefix(text)
    for positions in ([0, 1, 2, 3], [12, 5, 9], [12]):
        prefixes, mask = left_pad([text[0, : p + 1] for p in positions], pad_id=0)
        a = orig.activations(prefixes, mask)
        vectors = [a, a + 0.5 * torch.randn(a.shape, generator=gen)]
        shared = orig.forward_at_positions(prefix, positions, vectors)
        naive = orig.naive_forward_with_replacement(prefixes, mask, vectors)
        for s, n in zip(shared, naive, strict=True):
            torch.testing.assert_close(s, n, atol=1e-5, rtol=1e-5)
    single = orig.shared_prefix(text[:, :1])
    (alone,) = orig.forward_at_positions(
        single, [0], [orig.activations(text[:, :1], text[:, :1] > 0)]
    )
    torch.testing.assert_close(
        alone, orig.clean_logits(text[:, :1], text[:, :1] > 0), atol=1e-5, rtol=1e-5
    )


def test_logits_after_p_equal_a_full_forward_with_the_replacement_at_p(orig):
    """M reading the true tokens after P with X written at P: row by row, what one forward over
    the context and those tokens gives with block L's output at P replaced; with A itself, M's
    plain forward; padding after a row's last real next token leaves its real positions alone."""
    ids, mask = _batch([7, 3, 11])
    gen = torch.Generator().manual_seed(5)
    after = torch.randint(1, 320, (3, 4), generator=gen)
    a = orig.activations(ids, mask)
    vectors = [a, a + 0.5 * torch.randn(a.shape, generator=gen)]
    got = orig.logits_after_replacement(ids, mask, after, torch.ones_like(after), vectors)
    assert [tuple(x.shape) for x in got] == [(3, 4, orig.model.config.vocab_size)] * 2
    for row in range(3):
        context = ids[row][mask[row].bool()]
        text = torch.cat([context, after[row]])[None]
        with torch.no_grad():
            plain = orig.model(input_ids=text).logits[0, len(context) :]
            with replace_at(orig.block, len(context) - 1, vectors[1][row : row + 1]):
                replaced = orig.model(input_ids=text).logits[0, len(context) :]
        torch.testing.assert_close(got[0][row], plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1][row], replaced, atol=1e-5, rtol=1e-5)
    assert (got[1] - got[0]).abs().max() > 1e-2  # the replacement reaches the later positions
    padded, real = after.clone(), torch.ones_like(after)
    padded[1, 2:], real[1, 2:] = 0, 0
    (short,) = orig.logits_after_replacement(ids, mask, padded, real, vectors[1:])
    torch.testing.assert_close(short[1, :2], got[1][1, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short[[0, 2]], got[1][[0, 2]], atol=1e-5, rtol=1e-5)


def test_padding_after_p_never_takes_a_position_past_the_models_range(orig):
    """A text that ends one token after P at the end of the model's range: its padded next
    columns repeat the last real position (a learned position table has no row past it)."""
    limit = getattr(orig.model.config, "n_positions", None) or 256
    gen = torch.Generator().manual_seed(2)
    context = torch.randint(1, 320, (1, limit - 1), generator=gen)
    after = torch.tensor([[7, 0, 0, 0]])
    real = torch.tensor([[1, 0, 0, 0]])
    a = orig.activations(context, torch.ones_like(context))
    (got,) = orig.logits_after_replacement(context, torch.ones_like(context), after, real, [a])
    with torch.no_grad():
        plain = orig.model(input_ids=torch.cat([context, after[:, :1]], 1)).logits[0, -1]
    torch.testing.assert_close(got[0, 0], plain, atol=1e-4, rtol=1e-4)


def test_left_padding_does_not_change_results(orig):
    ids, mask = _batch([6, 11])
    alone_ids, alone_mask = ids[:1, -6:], mask[:1, -6:]
    vec = torch.randn(1, orig.d_model)
    padded = orig.forward_with_replacement(ids, mask, [torch.cat([vec, vec])])[0][0]
    alone = orig.forward_with_replacement(alone_ids, alone_mask, [vec])[0][0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        orig.activations(ids, mask)[0], orig.activations(alone_ids, alone_mask)[0]
    )


def test_gradients_reach_vectors_not_weights(orig):
    ids, mask = _batch([8, 4])
    vec = orig.activations(ids, mask).clone().requires_grad_(True)
    first, second = orig.forward_with_replacement(ids, mask, [vec, vec * 2])
    (first.sum() + second.square().sum()).backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in orig.model.parameters())


def test_activation_is_block_output(orig):
    ids, mask = _batch([10])
    hidden = orig.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(orig.activations(ids, mask)[0], hidden[orig.layer + 1][0, -1])


def test_bad_inputs_are_refused(orig):
    ids, mask = _batch([5, 3])
    with pytest.raises(LensError, match="shape"):
        orig.forward_with_replacement(ids, mask, [torch.zeros(2, orig.d_model + 1)])
    with pytest.raises(LensError, match="matching"):
        orig.forward_with_replacement(ids[:, 1:], mask, [torch.zeros(2, orig.d_model)])
    right_padded = mask.flip(-1)
    # The training step's call leaves the last column unread (a host sync); M's others check it.
    for read in (orig.clean_logits, orig.activations):
        with pytest.raises(LensError, match="last column"):
            read(ids, right_padded)


def test_8bit_needs_cuda():
    with pytest.raises(LensError, match="CUDA"):
        load_8bit("whatever", device="cpu")


def test_head_reads_a_contiguous_input_once_and_logits_are_unchanged(tiny_llama_dir):
    """The CPU speed fix on the vocabulary projection changes no value and is installed once."""
    from consistency_lens.models.adapter import contiguous_head
    from consistency_lens.models.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    head = loaded.model.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1
    contiguous_head(loaded.model)
    assert len(head._forward_pre_hooks) == 1
    hidden = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))[:, -2:]
    assert not hidden.is_contiguous()
    expected = hidden.contiguous() @ head.weight.T
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_head_on_the_last_position_runs_one_mm_not_a_batched_copy(tiny_llama_dir, rows):
    """A (B, 1, d) slice of a longer sequence reaches the head as one mm, batch 1 included: a
    size-1 dim's stale stride made matmul take its batched path and copy the whole (d, V) weight."""
    from torch.profiler import ProfilerActivity, profile

    from consistency_lens.models.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    head = loaded.model.get_output_embeddings()
    hidden = torch.randn(rows, 5, 64, generator=torch.Generator().manual_seed(0))[:, -1:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = head(hidden)
    names = {e.name for e in prof.events()}
    assert "aten::mm" in names and "aten::bmm" not in names
    torch.testing.assert_close(logits, hidden.contiguous() @ head.weight.T, rtol=0, atol=1e-6)


def test_patched_forward_reads_nothing_back_to_the_host(orig, padded_passes):
    """The training step's call of M makes no host sync: transformers gets a ready 4-D mask
    instead of reading the padding back to decide whether it needs one."""
    ids, mask = _batch([9, 5, 14])
    vectors = [torch.randn(3, orig.d_model), torch.randn(3, orig.d_model)]
    with no_host_reads():
        orig.forward_with_replacement(ids, mask, vectors)


def _config(impl: str, window: int | None = None):
    from transformers import LlamaConfig, MistralConfig

    cfg = MistralConfig(sliding_window=window) if window else LlamaConfig()
    cfg._attn_implementation = impl
    return cfg


def test_causal_mask_by_hand():
    """Real earlier-or-same columns are allowed; a padding query attends everywhere (finite)."""
    from consistency_lens.models.inputs import causal_mask

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    got = causal_mask(mask, 2, _config("sdpa"), torch.float32)
    expected = torch.tensor(
        [[[False, True, False], [False, True, True]], [[True, True, False], [True, True, True]]]
    ).unsqueeze(1)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    full = causal_mask(mask, 3, _config("sdpa"), torch.float32)
    assert torch.equal(full[0, 0, 0], torch.tensor([True, True, True]))  # the padding query
    assert torch.equal(full[:, :, 1:], causal_mask(mask, 2, _config("sdpa"), torch.float32))
    eager = causal_mask(mask, 2, _config("eager"), torch.bfloat16)
    lowest = torch.finfo(torch.bfloat16).min
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager, torch.where(expected, 0.0, lowest).to(torch.bfloat16))
    # Where transformers must build the mask itself, the 2-D mask goes through unchanged.
    assert causal_mask(mask, 2, _config("flash_attention_2"), torch.float32) is mask
    assert causal_mask(mask, 2, _config("sdpa", window=2), torch.float32) is mask
    assert causal_mask(mask, 2, _config("sdpa", window=3), torch.float32).dim() == 4


def test_the_clean_prefix_pass_computes_no_logits(orig, padded_passes):
    """M's prefix pass runs for its kv cache: the head reads no row of it, and the patched pass's
    head reads one row per vector set."""
    ids, mask = _batch([5, 8, 3])
    rows = []
    head = orig.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(tuple(args[0].shape)))
    try:
        vectors = orig.activations(ids, mask)
        rows.clear()
        orig.forward_with_replacement(ids, mask, [vectors, vectors + 1])
    finally:
        handle.remove()
    assert rows == [(3, 0, orig.d_model), (6, 1, orig.d_model)]


def test_packed_patched_forward_equals_the_padded_one_with_its_gradient(orig, monkeypatch):
    """M's patched pass with the clean prefixes packed (the CPU's) gives the padded pass's logits
    and the same gradient to the replacement vectors."""
    from consistency_lens.models import inputs

    ids, mask = _batch([9, 5, 14, 1])
    assert inputs.can_pack(orig.model.config, ids.device, mask)
    base = [orig.activations(ids, mask), torch.randn(4, orig.d_model)]
    results = {}
    for name, devices in (("packed", inputs.PACK_DEVICES), ("padded", frozenset())):
        monkeypatch.setattr(inputs, "PACK_DEVICES", devices)
        vectors = [v.clone().requires_grad_(i == 1) for i, v in enumerate(base)]
        logits = orig.forward_with_replacement(ids, mask, vectors)
        logits[1].logsumexp(-1).sum().backward()
        results[name] = ([x.detach() for x in logits], vectors[1].grad)
    for got, want in zip(results["packed"][0], results["padded"][0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["packed"][1], results["padded"][1], atol=1e-5, rtol=1e-5)
    assert results["packed"][1].abs().sum() > 0
    # Rows that all end at P = 0 under a padding column leave no prefix to pack: the padded path.
    ids, mask = torch.tensor([[0, 5], [0, 7]]), torch.tensor([[0, 1], [0, 1]])
    assert not inputs.can_pack(orig.model.config, ids.device, mask[:, :-1])
    (alone,) = orig.forward_with_replacement(ids, mask, [orig.activations(ids, mask)])
    torch.testing.assert_close(alone, orig.clean_logits(ids, mask), atol=1e-5, rtol=1e-5)


def test_tile_cache_stacks_copies_and_leaves_the_original_untouched(orig):
    """A batch of one is broadcast, a larger batch tiled row-block by row-block, `upto` cuts
    positions; a pass over the tiled cache grows only the new cache."""
    from transformers import DynamicCache

    from consistency_lens.models.inputs import tile_cache

    for rows in (1, 2):
        ids, mask = _batch([5] * rows, seed=rows)
        cache = DynamicCache(config=orig.model.config)
        orig.model(
            input_ids=ids, attention_mask=mask, use_cache=True, **orig.parts.cache_kwargs(cache)
        )
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        tiled = tile_cache(cache, 3, upto=4)
        for layer, (k, v) in zip(tiled.layers, before, strict=True):
            assert layer.keys.shape[0] == 3 * rows and layer.keys.shape[2] == 4
            # One row is broadcast (no copy: stride 0 along the batch); more rows are copied.
            assert (layer.keys.stride(0) == 0) == (rows == 1)
            torch.testing.assert_close(layer.keys, k[:, :, :4].repeat(3, 1, 1, 1), rtol=0, atol=0)
            torch.testing.assert_close(layer.values, v[:, :, :4].repeat(3, 1, 1, 1), rtol=0, atol=0)
        orig.model(
            input_ids=torch.ones(3 * rows, 1, dtype=torch.long),
            attention_mask=torch.ones(3 * rows, 5, dtype=torch.long),
            use_cache=True,
            **orig.parts.cache_kwargs(tiled),
        )
        assert tiled.layers[0].keys.shape[2] == 5
        for layer, (k, v) in zip(cache.layers, before, strict=True):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
