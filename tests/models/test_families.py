"""Every model family the adapter claims, end to end on a tiny random model of that family.

For each family: the dump stores block L's output at P, M's cached patched forward equals the
naive one, D's KV-cached soft generation equals one uncached forward (the embedding slot and the
hidden-state injection), a two-step training run resumes bit for bit, and `explain` runs.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    assert_dump_is_block_output,
    decoder_full_forward,
    save_with_tokenizer,
    signal_after_step,
    split_of,
    tiny_dump_config,
    tiny_train_config,
)
from safetensors.torch import load_file

from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.evaluation.explain import explain_command
from consistency_lens.models import inputs
from consistency_lens.models.adapter import FAMILIES, find_parts
from consistency_lens.models.decoder import DecoderModel
from consistency_lens.models.encoder import EncoderModel
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper
from consistency_lens.models.patching import patched_kl
from consistency_lens.training import trainer
from consistency_lens.utils.logging import METRICS, MetricsFile

PROMPT = "the nation <embed> law tax"
# Shared by every family: 3 blocks of width 64, 4 heads of 16 (2 key/value heads where the family
# has grouped-query attention), the fixture tokenizer's 320 tokens, token 0 for BOS/EOS/pad.
_IDS = {"vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    **_IDS,
}
_GQA = {**_DECODER, "num_key_value_heads": 2, "head_dim": 16}
# A window shorter than the dump's contexts and D's prompt + text, so sliding-window caches slide.
_WINDOW = 6
# Gemma scales its embeddings by sqrt(d): a width whose root no bf16 can hold checks that one-hots
# and ids are scaled alike.
_GEMMA = {**_GQA, "hidden_size": 72}
_GEMMA_TEXT = {**_GEMMA, "query_pre_attn_scalar": 16, "sliding_window": _WINDOW}
# Gemma 3's multimodal model, its vision tower the smallest SigLIP that builds (never run here).
_SIGLIP = transformers.SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
_IMAGE_TOKENS = {"image_token_index": 319, "boi_token_index": 317, "eoi_token_index": 318}

# model_type -> the tiny config of that family.
CONFIGS: dict[str, transformers.PretrainedConfig] = {
    "gpt2": transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **_IDS),
    "llama": transformers.LlamaConfig(**_GQA),
    "qwen2": transformers.Qwen2Config(**_GQA),
    "qwen3": transformers.Qwen3Config(**_GQA),
    "mistral": transformers.MistralConfig(**_GQA, sliding_window=_WINDOW),
    "gemma": transformers.GemmaConfig(**_GEMMA),
    "gemma2": transformers.Gemma2Config(**_GEMMA_TEXT),
    "gemma3_text": transformers.Gemma3TextConfig(**_GEMMA_TEXT),
    "gemma3": transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**_GEMMA_TEXT),
        vision_config=_SIGLIP,
        mm_tokens_per_image=1,
        **_IMAGE_TOKENS,
    ),
    "gpt_neox": transformers.GPTNeoXConfig(**_DECODER),
    "phi": transformers.PhiConfig(**_DECODER, num_key_value_heads=2),
    "phi3": transformers.Phi3Config(**_DECODER, num_key_value_heads=2, sliding_window=_WINDOW),
}


def test_every_family_of_the_adapter_is_tested():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory, tokenizer_dir, corpus_dir) -> dict:
    """A tiny random model of one family saved with the fixture tokenizer, and a dump of it."""
    name = request.param
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name])
    root = tmp_path_factory.mktemp(name)
    model_dir = save_with_tokenizer(model, tokenizer_dir, root / "model")
    base = tiny_dump_config(
        root, model_dir, corpus_dir, seq_len=24, num_samples=16, val_samples=8, shard_size=8
    )
    dump_activations(config_from_dict(base))
    return {"name": name, "model": model_dir, "base": base, "root": root}


@pytest.fixture(scope="module")
def loaded(family):
    """The family's model loaded as the lens loads it (fp32, CPU)."""
    return load_model(str(family["model"]), device="cpu", dtype="float32")


def test_dump_stores_block_output_at_P(family):
    cfg = config_from_dict(family["base"])
    for split, n in (("train", 16), ("val", 8)):
        assert assert_dump_is_block_output(family["model"], cfg, split_of(cfg, split)) == n


# Contexts longer than the sliding window (transformers builds the mask from the 2-D one) and
# within it (M hands transformers its own 4-D mask, for every family): with each family's default
# attention (sdpa; eager for Gemma 2) and with eager attention (the additive 4-D mask).
@pytest.mark.parametrize("lengths", [(9, 5, 14), (3, 5, 4)])
@pytest.mark.parametrize("attention", ["auto", "eager"])
def test_patched_forward_equals_naive_and_clean_patch_is_a_no_op(
    family, loaded, lengths, attention
):
    if attention != "auto":
        loaded = load_model(
            str(family["model"]), device="cpu", dtype="float32", attn_implementation=attention
        )
        assert loaded.model.config.get_text_config()._attn_implementation == attention
    orig = OriginalModelWrapper(loaded, layer=1)
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(1, 320, (n,), generator=gen) for n in lengths], 0)
    a = orig.activations(ids, mask)
    (patched,) = orig.forward_with_replacement(ids, mask, [a])
    torch.testing.assert_close(patched, orig.clean_logits(ids, mask), atol=1e-5, rtol=1e-5)
    vectors = [a + 0.5 * torch.randn(a.shape, generator=gen), torch.randn(a.shape, generator=gen)]
    cheap = orig.forward_with_replacement(ids, mask, vectors)
    naive = orig.naive_forward_with_replacement(ids, mask, vectors)
    for c, n in zip(cheap, naive, strict=True):
        torch.testing.assert_close(c, n, atol=1e-5, rtol=1e-5)
    assert (cheap[1] - patched).abs().max() > 1e-3


@pytest.mark.parametrize("budget", [512, 10])
def test_packed_greedy_continuation_equals_the_padded_one(loaded, monkeypatch, budget):
    """Rows packed end to end (all in one packed row, or several, one longer than the budget
    alone) continue as the padded batch does, wherever the model can be packed."""
    orig = OriginalModelWrapper(loaded, layer=1)
    monkeypatch.setattr(inputs, "PACK_TOKENS", budget)
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_pad([torch.randint(1, 320, (n,), generator=gen) for n in (4, 5, 14, 3, 2)], 0)
    config = loaded.model.config
    window = getattr(config.get_text_config(), "sliding_window", None)
    assert inputs.can_pack(config, ids.device, mask) == (window is None)
    second = lambda logits: logits.topk(2, dim=-1).indices[:, 1]  # noqa: E731
    for first in (None, second):
        got = orig.greedy_continuation(ids, mask, 3, first)
        assert torch.equal(got, orig._greedy_uncached(ids, mask, 3, first))


def test_pack_lays_rows_end_to_end_within_the_budget(monkeypatch):
    """Batch rows go in order into packed rows of at most `PACK_TOKENS` tokens (a longer row
    alone), each at its own positions, with padding columns that match no other column."""
    monkeypatch.setattr(inputs, "PACK_TOKENS", 10)
    config = transformers.LlamaConfig(attn_implementation="sdpa")
    rows = [torch.arange(1, n + 1) * 10 + i for i, n in enumerate((4, 5, 14, 3, 2))]
    ids, mask = left_pad(rows, 0)
    packed = inputs.pack(ids, mask, config, torch.float32)
    assert packed.pack.tolist() == [0, 0, 1, 2, 2]
    assert packed.slot.tolist() == [0, 1, 0, 0, 1]
    assert packed.last.tolist() == [3, 8, 13, 2, 4]
    assert packed.input_ids[0, :9].tolist() == rows[0].tolist() + rows[1].tolist()
    assert packed.position_ids[2, :5].tolist() == [0, 1, 2, 0, 1]
    assert packed.segments[0].tolist() == [0] * 4 + [1] * 5 + [-10, -11, -12, -13, -14]
    first, keep, index = packed.first()
    assert first["input_ids"] is packed.input_ids
    assert first["position_ids"] is packed.position_ids
    assert keep[index].tolist() == packed.last.tolist()
    mask4d = first["attention_mask"]
    # Row 1's last token sees rows 1's five tokens only; a padding column sees itself alone.
    assert mask4d[0, 0, 8].nonzero().flatten().tolist() == [4, 5, 6, 7, 8]
    assert mask4d[0, 0, 10].nonzero().flatten().tolist() == [10]
    step = packed.step(torch.tensor([7, 8, 9, 10, 11]))
    assert step["input_ids"].tolist() == [[7, 8], [9, 0], [10, 11]]
    assert step["position_ids"].tolist() == [[4, 5], [14, 0], [3, 2]]
    # The new token of row 1 (packed row 0, slot 1, column 15) sees its row and itself.
    seen = step["attention_mask"][0, 0, 1].nonzero().flatten().tolist()
    assert seen == [4, 5, 6, 7, 8, 15]


# (2, 1, 3) with 3 tokens after it fits the sliding-window families' window of 6: the cached path.
@pytest.mark.parametrize("lengths", [(9, 5, 14), (3, 5, 4), (2, 1, 3)])
def test_greedy_continuation_equals_each_row_read_alone(loaded, lengths):
    """M's greedy tokens after P from the kv-cached batch (the re-reading path where a sliding
    window is shorter than the text) equal those of each row's own full forwards, unpadded."""
    orig = OriginalModelWrapper(loaded, layer=1)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 320, (n,), generator=gen) for n in lengths]
    ids, mask = left_pad(rows, 0)
    got = orig.greedy_continuation(ids, mask, 3)
    assert torch.equal(got, orig._greedy_uncached(ids, mask, 3))
    for row, seq in zip(got.tolist(), rows, strict=True):
        text = seq.unsqueeze(0)
        for _ in range(3):
            token = orig.token_logits(text)[:, -1].argmax(-1, keepdim=True)
            text = torch.cat([text, token], 1)
        assert row == text[0, -3:].tolist()
    # A chosen first token (here M's second-ranked one): the later tokens are greedy after it.
    second = lambda logits: logits.topk(2, dim=-1).indices[:, 1]  # noqa: E731
    picked = orig.greedy_continuation(ids, mask, 3, second)
    assert torch.equal(picked, orig._greedy_uncached(ids, mask, 3, second))
    for row, seq in zip(picked.tolist(), rows, strict=True):
        text = seq.unsqueeze(0)
        for i in range(3):
            logits = orig.token_logits(text)[:, -1]
            token = (second(logits) if i == 0 else logits.argmax(-1)).unsqueeze(-1)
            text = torch.cat([text, token], 1)
        assert row == text[0, -3:].tolist()
    assert picked[:, 0].tolist() != got[:, 0].tolist()


@pytest.mark.parametrize("inject_layer", [None, 1])
def test_soft_generation_equals_uncached_forward(loaded, inject_layer):
    ids = torch.randint(1, 320, (3, 9), generator=torch.Generator().manual_seed(0))
    acts = OriginalModelWrapper(loaded, layer=1).activations(ids, torch.ones_like(ids))
    dec = DecoderModel(
        loaded.model, loaded.tokenizer, PROMPT, acts.shape[1], 0.7, inject_layer=inject_layer
    )
    torch.manual_seed(0)
    # Longer than the sliding window: the cached generation must slide like the full forward.
    gen = dec.generate_soft(acts, max_length=8, tau=1.0)
    expected = decoder_full_forward(dec, loaded, PROMPT, acts, gen.discrete_token_ids)
    torch.testing.assert_close(gen.token_logits.detach(), expected.detach(), atol=1e-4, rtol=1e-4)
    forced = dec.teacher_forced_logits(acts, gen.discrete_token_ids)
    torch.testing.assert_close(forced.detach(), expected.detach(), atol=1e-4, rtol=1e-4)


def test_encoder_reads_after_its_cached_prompt_as_in_one_pass(loaded):
    """E without a gradient (its prompt run once, the texts over its kv cache) gives the Â of
    the one pass over prompt and text, padded rows and texts longer than the window included."""
    enc = EncoderModel(loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people")
    seqs = [torch.randint(1, 320, (n,), generator=torch.Generator().manual_seed(n)) for n in (8, 3)]
    ids, mask = left_pad(seqs, pad_id=0)
    widths = []
    hook = loaded.parts.blocks[0].register_forward_hook(
        lambda _m, _i, out: widths.append((out[0] if isinstance(out, tuple) else out).shape[1])
    )
    with hook, torch.no_grad():
        cached = enc.encode_ids(ids, mask)
    hook.remove()
    assert widths == [enc.prompt.shape[0], 8]  # the prompt once, then the texts alone
    torch.testing.assert_close(cached, enc.encode_ids(ids, mask).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_equal_the_models_own_embedding(loaded, dtype):
    """One-hots and ids embed to the same rows as the model's own forward, its scale included."""
    model = copy.deepcopy(loaded.model).to(dtype)
    parts = find_parts(model)
    ids = torch.tensor([[3, 17, 250]])
    onehot = torch.nn.functional.one_hot(ids, 320).float()
    assert torch.equal(parts.embed_onehots(onehot), parts.embed_ids(ids))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        via_embeds = model(inputs_embeds=parts.embed_ids(ids)).logits
    assert torch.equal(plain, via_embeds)


def _train_cfg(family: dict, run: str):
    train = tiny_train_config(family["root"] / run, mode="full", t_text=3, steps=2)
    return config_from_dict({**family["base"], "train": train})


@pytest.fixture(scope="module")
def trained(family) -> Path:
    """Two uninterrupted `full`-mode steps on the family's dump; the run directory."""
    cfg = _train_cfg(family, "straight")
    trainer.train(cfg)
    return Path(cfg.train.run_dir)


def _records(run_dir: Path) -> list[dict]:
    drop = {"time", "samples_per_s"}
    return [
        {k: v for k, v in r.items() if k not in drop} for r in MetricsFile(run_dir / METRICS).read()
    ]


def test_two_steps_resume_bit_for_bit(family, trained, monkeypatch):
    cfg = _train_cfg(family, "resumed")
    step = signal_after_step(monkeypatch, signal.SIGTERM, step=1)
    with pytest.raises(LensError, match="SIGTERM at step 1"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "_train_step", step)
    trainer.train(cfg, resume=True)
    a = load_file(str(trained / "lens" / "lens.safetensors"))
    b = load_file(str(Path(cfg.train.run_dir) / "lens" / "lens.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(trained) == _records(Path(cfg.train.run_dir))


def test_explain_every_token(family, trained):
    cfg = _train_cfg(family, "straight")
    text = "the nation economy congress"
    rows = explain_command(cfg, None, text, None)
    assert "".join(r["token"] for r in rows) == text
    assert all(r["kl"] >= 0 and -1 <= r["cosine"] <= 1 for r in rows)
    # The batched rows agree with the lens run on the last token's context alone.
    lens = ConsistencyLens.from_pretrained(trained / "lens")
    ids = torch.tensor([lens.loaded.tokenizer(text).input_ids])
    a = lens.orig.activations(ids, torch.ones_like(ids))
    expl, a_hat = lens.reconstruct(a, greedy=True)
    (kl,) = patched_kl(lens.orig, ids, torch.ones_like(ids), a, [a_hat])
    assert rows[-1]["explanation"] == lens.loaded.tokenizer.decode(expl[0].tolist())
    assert rows[-1]["kl"] == pytest.approx(float(kl[0]), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_onehots_equals_the_matmul_with_its_gradients(loaded, dtype):
    """Straight-through one-hots (hot value exactly 1) embed exactly as `onehots @ table`
    would, and both the one-hots and a trainable table get the matmul's gradients."""
    from consistency_lens.models.decoder import gumbel_softmax_hard

    model = copy.deepcopy(loaded.model).to(dtype)
    parts = find_parts(model)
    table = parts.embed.weight
    table.requires_grad_(True)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 320, requires_grad=True)
    onehots, _ = gumbel_softmax_hard(logits, 0.7)
    weights = torch.randn(2, 3, table.shape[1])

    def backward(out):
        logits.grad = table.grad = None
        (out.float() * weights).sum().backward(retain_graph=True)
        return logits.grad.clone(), table.grad.clone()

    out = parts.embed_onehots(onehots)
    grads = backward(out)
    flat = onehots.reshape(-1, 320).to(dtype) @ table
    reference = flat.reshape(2, 3, -1) * parts.embed_scale
    expected = backward(reference)
    assert torch.equal(out, reference)
    torch.testing.assert_close(grads[0], expected[0], rtol=0, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grads[1], expected[1], rtol=tol, atol=tol)


def test_embed_onehots_under_autocast_keeps_the_table_dtype_and_a_bf16_backward(loaded):
    """Under bf16 autocast (fp32 weights, as `full` mode on a GPU), the rows come out in the
    table's dtype like `embed_ids`' and the one-hots' gradient is the autocast matmul's, bit for
    bit: the backward restores the forward's autocast."""
    from consistency_lens.models.decoder import gumbel_softmax_hard

    parts = find_parts(loaded.model)
    table = parts.embed.weight
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 320, requires_grad=True)
    onehots, ids = gumbel_softmax_hard(logits, 0.7)
    weights = torch.randn(2, 3, table.shape[1])
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = parts.embed_onehots(onehots)
        reference = (onehots.reshape(-1, 320).to(table.dtype) @ table).reshape(2, 3, -1)
        reference = reference * parts.embed_scale
    for rows in (out, reference):
        logits.grad = None
        (rows.float() * weights).sum().backward(retain_graph=True)
        grads.append(logits.grad.clone())
    assert out.dtype == table.dtype and reference.dtype == torch.bfloat16
    assert torch.equal(out, parts.embed_ids(ids))
    # Equal up to the bf16 rounding of the reference (Gemma's scale is applied after it, in
    # bf16 there and in fp32 here, in both passes).
    torch.testing.assert_close(out.bfloat16(), reference, rtol=1e-2, atol=0)
    if parts.embed_scale == 1.0:
        assert torch.equal(grads[0], grads[1])
    else:
        scale = float(grads[1].abs().max())
        torch.testing.assert_close(grads[0], grads[1], rtol=3e-2, atol=1e-2 * scale)
