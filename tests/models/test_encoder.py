"""Encoder E: reads block L's final-token output, one-hots == ids, early exit, padding, prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error

from consistency_lens.config import config_from_dict
from consistency_lens.errors import LensError
from consistency_lens.models.encoder import EncoderModel, rotate_text
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


def test_rotate_text_moves_the_last_real_tokens_first():
    x = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 8, 9], [0, 0, 0, 0, 6], [0, 0, 0, 2, 3]])
    mask = x != 0
    # Unpadded: a plain roll; padded: only the real tokens turn, the padding stays in front; a
    # row shorter than k turns by k modulo its length.
    assert torch.equal(rotate_text(x[:1], 2), torch.tensor([[4, 5, 1, 2, 3]]))
    turned = torch.tensor([[4, 5, 1, 2, 3], [0, 0, 8, 9, 7], [0, 0, 0, 0, 6], [0, 0, 0, 2, 3]])
    assert torch.equal(rotate_text(x, 2, mask), turned)
    assert torch.equal(rotate_text(x, 3, mask.float())[3], torch.tensor([0, 0, 0, 3, 2]))
    assert torch.equal(rotate_text(x, 0, mask), x)
    # Trailing dimensions (embeddings) travel with their token.
    emb = x.unsqueeze(-1).expand(-1, -1, 3).float()
    assert torch.equal(rotate_text(emb, 2, mask)[..., 1], rotate_text(x, 2, mask).float())


def test_rotated_encoder_reads_the_rotated_text(loaded):
    """`rotate=k` is E without rotation reading the text with its last k tokens first, on every
    path (ids, one-hots, left-padded ids), and the gradient reaches each one-hot in its place."""
    enc = EncoderModel(loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people")
    rot = EncoderModel(loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people", rotate=2)
    rot.load_state_dict(enc.state_dict())
    ids = _ids(2, 5)
    moved = torch.cat([ids[:, -2:], ids[:, :-2]], 1)
    assert torch.equal(rot.encode_ids(ids), enc.encode_ids(moved))
    assert not torch.allclose(rot.encode_ids(ids), enc.encode_ids(ids))
    assert torch.equal(rot(F.one_hot(ids, 320).float(), ids), enc.encode_ids(moved))
    short = _ids(1, 3, 3)[0]
    padded, mask = left_pad([short, ids[0]], pad_id=0)
    torch.testing.assert_close(
        rot.encode_ids(padded, mask)[0],
        enc.encode_ids(torch.cat([short[-2:], short[:-2]]).unsqueeze(0))[0],
        atol=1e-5,
        rtol=1e-5,
    )
    onehots = F.one_hot(ids, 320).float().requires_grad_(True)
    shifted = F.one_hot(moved, 320).float().requires_grad_(True)
    rot(onehots).square().sum().backward()
    enc(shifted).square().sum().backward()
    torch.testing.assert_close(onehots.grad, shifted.grad.roll(-2, 1))


def test_encoder_rotate_must_leave_a_token_in_place(capsys, tmp_path):
    """train.encoder_rotate is 0..t_text-1: refused in one sentence, exit 2, nothing written."""
    with pytest.raises(LensError, match=r"train.encoder_rotate=3 must be less than train.t_text=3"):
        config_from_dict({"train": {"t_text": 3, "encoder_rotate": 3}})
    assert config_from_dict({"train": {"t_text": 3, "encoder_rotate": 2}}).train.encoder_rotate == 2
    run_dir = tmp_path / "run"
    line = cli_error(
        capsys,
        ["train", "train.t_text=2", "train.encoder_rotate=2", f"train.run_dir={run_dir}"],
        sole_error_line=True,
    )
    assert "train.encoder_rotate=2 must be less than train.t_text=2" in line
    assert not run_dir.exists()


def test_decoder_rotate_fits_the_text_and_its_objectives(capsys, tmp_path):
    """train.decoder_rotate is 0..t_text-1 and only for the objectives whose D samples texts of
    fixed length: refused in one sentence otherwise, exit 2, nothing written."""
    with pytest.raises(LensError, match=r"train.decoder_rotate=3 must be less than train.t_text=3"):
        config_from_dict({"train": {"t_text": 3, "decoder_rotate": 3}})
    with pytest.raises(LensError, match=r"works only with .* not plan; set train.decoder_rotate=0"):
        config_from_dict({"train": {"t_text": 4, "decoder_rotate": 2, "objective": "plan"}})
    ok = {"t_text": 4, "decoder_rotate": 2, "objective": "grpo"}
    ok["warm_start"] = {"steps": 10, "objective": "warm_start_predict"}
    assert config_from_dict({"train": ok}).train.decoder_rotate == 2
    ok["predict"] = {"tokens": 2, "order": "prediction_first"}
    with pytest.raises(LensError, match=r"set train.predict.order=context_first"):
        config_from_dict({"train": ok})
    ok["warm_start"] = {"steps": 10, "objective": "warm_start_next"}
    with pytest.raises(LensError, match=r"not warm_start_next;"):
        config_from_dict({"train": ok})
    ok["warm_start"] = {"steps": 0, "objective": "warm_start_next"}  # never run: accepted
    assert config_from_dict({"train": ok}).train.decoder_rotate == 2
    run_dir = tmp_path / "run"
    line = cli_error(
        capsys,
        [
            "train",
            "train.t_text=4",
            "train.decoder_rotate=1",
            "train.objective=plan",
            f"train.run_dir={run_dir}",
        ],
        sole_error_line=True,
    )
    assert "train.decoder_rotate=1 works only with" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("rotate", [0, 2])
def test_reading_without_gradient_runs_the_prompt_once_and_reads_the_same(loaded, rotate):
    """Without a gradient E runs its prompt once for the batch and the texts over its kv cache:
    the same Â as the one pass over prompt and text that training differentiates, padded rows
    included."""
    enc = EncoderModel(
        loaded.model, loaded.tokenizer, 1, 64, 1.0, prompt="the people", rotate=rotate
    )
    ids, mask = left_pad([_ids(1, n, seed=n)[0] for n in (5, 3, 5, 1)], pad_id=0)
    calls = []

    def seen(_module, _inputs, output):
        calls.append((output[0] if isinstance(output, tuple) else output).shape[:2])

    hook = loaded.parts.blocks[0].register_forward_hook(seen)
    with hook:
        with torch.no_grad():
            cached = enc.encode_ids(ids, mask)
        one_pass = enc.encode_ids(ids, mask)
    assert one_pass.requires_grad and not cached.requires_grad
    torch.testing.assert_close(cached, one_pass.detach(), atol=1e-5, rtol=1e-5)
    # The prompt's pass reads one row, the texts' pass only the texts' columns.
    assert calls == [(1, enc.prompt.shape[0]), (4, 5), (4, 5 + enc.prompt.shape[0])]
