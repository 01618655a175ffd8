"""Encoder E: reads block L's final-token output, one-hots == ids, early exit, padding, prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from consistency_lens.errors import LensError
from consistency_lens.models.encoder import EncoderModel
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import load_model
from consistency_lens.models.orig import OriginalModelWrapper


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    return load_model(str(path), device="cpu", dtype="float32")


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_identity_encoder_reads_block_output(loaded):
    enc = EncoderModel(loaded.model, loaded.tokenizer, 1, loaded.parts.d_model, 1.0)
    orig = OriginalModelWrapper(loaded, layer=1)
    ids = _ids(2, 6)
    expected = orig.activations(ids, torch.ones_like(ids))
    torch.testing.assert_close(enc.encode_ids(ids).detach(), expected, atol=1e-5, rtol=1e-5)
    onehots = F.one_hot(ids, 320).float()
    torch.testing.assert_close(enc(onehots).detach(), expected, atol=1e-5, rtol=1e-5)
    # What lets GRPO and the warm start read ids instead of building (B, T, V) one-hots.
    assert torch.equal(enc(onehots), enc.encode_ids(ids))


def test_later_blocks_never_run(loaded):
    enc = EncoderModel(loaded.model, loaded.tokenizer, 0, loaded.parts.d_model, 1.0)
    calls = []
    handle = loaded.parts.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        enc.encode_ids(_ids(2, 4))
    finally:
        handle.remove()
    assert calls == []


def test_left_padding_matches_unpadded(loaded):
    enc = EncoderModel(loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people")
    short, long = _ids(1, 3, 1)[0], _ids(1, 7, 2)[0]
    ids, mask = left_pad([short, long], pad_id=0)
    padded = enc.encode_ids(ids, mask)
    torch.testing.assert_close(
        padded[0], enc.encode_ids(short.unsqueeze(0))[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        padded[1], enc.encode_ids(long.unsqueeze(0))[0], atol=1e-5, rtol=1e-5
    )


def test_gradients_flow_to_onehots_prompt_and_projection(loaded):
    enc = EncoderModel(loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people")
    onehots = F.one_hot(_ids(2, 4), 320).float().requires_grad_(True)
    enc(onehots).square().sum().backward()
    assert onehots.grad.abs().sum() > 0
    assert enc.prompt.grad.abs().sum() > 0
    assert enc.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.model.parameters())


def test_bad_inputs(loaded):
    with pytest.raises(LensError, match="encoder_layer"):
        EncoderModel(loaded.model, loaded.tokenizer, 99, 64, 1.0)
    enc = EncoderModel(loaded.model, loaded.tokenizer, 0, 64, 1.0)
    with pytest.raises(LensError, match="one-hots"):
        enc(torch.zeros(2, 3, 10))
