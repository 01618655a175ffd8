"""ConsistencyLens: the three trainable modes, parameter groups, save/load and its refusals."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from conftest import batch_of
from safetensors.torch import save_file

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.models.adapter import find_parts
from consistency_lens.models.lens import ConsistencyLens, check_lens_dir
from consistency_lens.models.loading import load_model
from consistency_lens.training.objectives.plan import compute_losses
from consistency_lens.utils.io import sha256_file


def _cfg(path, **train) -> LensConfig:
    train.setdefault("t_text", 3)
    return LensConfig(model=str(path), device="cpu", model_dtype="float32", layer=1, train=train)


def _batch(lens: ConsistencyLens, lengths=(5, 8, 3)) -> Batch:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 320, (n,), generator=gen) for n in lengths]
    return batch_of(lens, seqs, seqs[::-1])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("mode", ["frozen_base", "full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_step_changes_exactly_the_trainable_params(mode, arch, tiny_llama_dir, tiny_gpt2_dir):
    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    lens = ConsistencyLens.build(_cfg(path, mode=mode, encoder_prompt="the law"))
    batch = _batch(lens)
    clean_before = lens.orig.clean_logits(batch.input_ids_A, batch.attention_mask_A)
    m_before = _snapshot(lens.orig.model)
    before = _snapshot(lens)
    trainable = {n for n, p in lens.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert set(lens.trainable_state_dict()) <= trainable
    opt = torch.optim.SGD(lens.param_groups(), lr=0.1)
    torch.manual_seed(0)
    compute_losses(lens, batch, tau=1.0, alpha=1.0).loss.backward()
    if mode == "lora":
        # Every adapter is in the graph (A's gradient is zero while B is still zero, but present).
        for name, param in lens.named_parameters():
            if "lora_" in name and param.grad is None:
                pytest.fail(f"{name} got no gradient")
    opt.step()
    after = _snapshot(lens)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert changed <= trainable
    if mode == "frozen_base":
        assert all(
            n.split(".")[1] in {"proj", "prompt_left", "prompt_right", "prompt"} for n in changed
        )
    else:
        assert any("layers" in n or ".h." in n for n in changed), "no block parameter trained"
    # M is untouched and sees no adapters.
    assert all(torch.equal(m_before[n], p) for n, p in lens.orig.model.named_parameters())
    clean_after = lens.orig.clean_logits(batch.input_ids_A, batch.attention_mask_A)
    torch.testing.assert_close(clean_before, clean_after, atol=0, rtol=0)


def test_param_groups_and_state_dict(tiny_llama_dir):
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir, mode="full", lr=3e-3, lr_blocks=2e-5))
    groups = {g["name"]: g for g in lens.param_groups()}
    assert groups["proj"]["lr"] == 3e-3 and groups["blocks"]["lr"] == 2e-5
    # E keeps blocks 0..L only, and only E's used parts train.
    assert len(find_parts(lens.encoder.model).blocks) == 2
    frozen = ConsistencyLens.build(_cfg(tiny_llama_dir, mode="frozen_base"))
    keys = set(frozen.trainable_state_dict())
    assert keys == {
        "decoder.prompt_left",
        "decoder.prompt_right",
        "decoder.proj.weight",
        "decoder.proj.bias",
        "encoder.proj.weight",
        "encoder.proj.bias",
    }
    assert [g["name"] for g in frozen.param_groups()] == ["proj"]


def test_layer_checks(tiny_llama_dir):
    with pytest.raises(LensError, match="layer=9"):
        ConsistencyLens.build(_cfg(tiny_llama_dir).model_copy(update={"layer": 9}))
    with pytest.raises(LensError, match="encoder_layer"):
        ConsistencyLens.build(_cfg(tiny_llama_dir, encoder_layer=7))
    with pytest.raises(LensError, match="8-bit"):
        cfg = _cfg(tiny_llama_dir, mode="full")
        cfg.distributed.orig_8bit = True
        ConsistencyLens.build(cfg)


@pytest.mark.parametrize("mode", ["frozen_base", "lora"])
def test_save_load_round_trip(mode, tiny_llama_dir, tmp_path):
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir, mode=mode))
    with torch.no_grad():
        for param in lens.trainable_state_dict():
            dict(lens.named_parameters())[param].add_(0.01)
    lens.save_pretrained(tmp_path / "lens", card="Trained for a test.")
    files = {p.name for p in (tmp_path / "lens").iterdir()}
    assert files == {"lens_config.json", "lens.safetensors", "README.md"}
    meta = json.loads((tmp_path / "lens" / "lens_config.json").read_text())
    assert (
        meta["layer"] == 1 and meta["d_model"] == 64 and meta["base_model"] == str(tiny_llama_dir)
    )
    assert "Trained for a test." in (tmp_path / "lens" / "README.md").read_text()
    again = ConsistencyLens.from_pretrained(tmp_path / "lens", device="cpu")
    for name, value in lens.trainable_state_dict().items():
        assert torch.equal(value, again.trainable_state_dict()[name])
    acts = _batch(lens).A
    ids, a_hat = lens.reconstruct(acts)
    ids2, a_hat2 = again.reconstruct(acts)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(a_hat, a_hat2)


def test_a_lens_recorded_on_cuda_loads_without_a_device_where_there_is_none(
    tiny_llama_dir, tmp_path
):
    """The recorded device is where it was trained, not where it must load (the shipped lens
    was trained on a GPU); without `device` the lens loads on CUDA if present, else the CPU."""
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir))
    lens.save_pretrained(tmp_path / "lens")
    meta = json.loads((tmp_path / "lens" / "lens_config.json").read_text())
    meta["config"]["device"] = "cuda"
    (tmp_path / "lens" / "lens_config.json").write_text(json.dumps(meta))
    again = ConsistencyLens.from_pretrained(tmp_path / "lens")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert again.device.type == expected and again.cfg.device == "auto"


def test_load_refuses_mismatch_and_corruption(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir))
    out = tmp_path / "lens"
    lens.save_pretrained(out)
    with pytest.raises(LensError, match="layer 1, not layer 2"):
        ConsistencyLens.from_pretrained(out, layer=2)
    other = load_model(str(tiny_gpt2_dir), device="cpu", dtype="float32")
    with pytest.raises(LensError, match="fingerprint"):
        ConsistencyLens.from_pretrained(out, loaded=other)
    meta = json.loads((out / "lens_config.json").read_text())
    meta["d_model"] = 128
    (out / "lens_config.json").write_text(json.dumps(meta))
    with pytest.raises(LensError, match="width 128"):
        ConsistencyLens.from_pretrained(out)
    lens.save_pretrained(out)
    flipped = bytearray((out / "lens.safetensors").read_bytes())
    flipped[-3] ^= 0x01  # inside the tensor data: still a well-formed safetensors file
    (out / "lens.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(LensError, match="lens.safetensors.*checksum"):
        ConsistencyLens.from_pretrained(out)
    (out / "lens.safetensors").write_bytes(b"garbage")
    with pytest.raises(LensError, match="lens.safetensors"):
        ConsistencyLens.from_pretrained(out)
    (out / "lens.safetensors").unlink()
    with pytest.raises(LensError, match="lens.safetensors"):
        ConsistencyLens.from_pretrained(out)
    (out / "lens_config.json").write_text("{not json")
    with pytest.raises(LensError, match="lens_config.json"):
        ConsistencyLens.from_pretrained(out)


def test_the_training_mean_is_saved_exactly_checked_and_refused_when_damaged(
    tiny_llama_dir, tmp_path
):
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir))
    out = tmp_path / "lens"
    lens.save_pretrained(out)
    assert not (out / "train_mean.safetensors").exists()  # none set: none saved
    assert ConsistencyLens.from_pretrained(out).train_mean is None
    mean = torch.randn(lens.d_model, generator=torch.Generator().manual_seed(0))
    lens.train_mean = mean
    lens.save_pretrained(out)
    meta = json.loads((out / "lens_config.json").read_text())
    assert meta["train_mean_sha256"] == sha256_file(out / "train_mean.safetensors")
    assert "train_mean.safetensors" in (out / "README.md").read_text()
    assert torch.equal(ConsistencyLens.from_pretrained(out).train_mean, mean)
    # Saved again without one, the stale file goes and the config names none.
    lens.train_mean = None
    lens.save_pretrained(out)
    assert not (out / "train_mean.safetensors").exists()
    assert "train_mean_sha256" not in json.loads((out / "lens_config.json").read_text())
    lens.train_mean = mean
    lens.save_pretrained(out)
    flipped = bytearray((out / "train_mean.safetensors").read_bytes())
    flipped[-3] ^= 0x01
    (out / "train_mean.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(LensError, match="train_mean.safetensors.*checksum"):
        ConsistencyLens.from_pretrained(out)
    with pytest.raises(LensError, match="train_mean.safetensors.*checksum"):
        check_lens_dir(out)  # what push and cast check first
    (out / "train_mean.safetensors").unlink()
    with pytest.raises(LensError, match="train_mean.safetensors' is missing"):
        ConsistencyLens.from_pretrained(out)
    # A well-formed file of the wrong width, with its checksum named: refused all the same.
    save_file({"mean": torch.zeros(lens.d_model + 1)}, str(out / "train_mean.safetensors"))
    meta["train_mean_sha256"] = sha256_file(out / "train_mean.safetensors")
    (out / "lens_config.json").write_text(json.dumps(meta))
    with pytest.raises(LensError, match="not one float vector of width"):
        ConsistencyLens.from_pretrained(out)


def test_wrong_mode_weights_are_refused(tiny_llama_dir, tmp_path):
    ConsistencyLens.build(_cfg(tiny_llama_dir, mode="lora")).save_pretrained(tmp_path / "l")
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir))
    from safetensors.torch import load_file

    with pytest.raises(LensError, match="another mode"):
        lens.load_trainable_state_dict(load_file(str(tmp_path / "l" / "lens.safetensors")))


def test_gradient_checkpointing_matches_plain_backward(tiny_llama_dir):
    grads = []
    for ckpt in (False, True):
        lens = ConsistencyLens.build(_cfg(tiny_llama_dir, mode="full", gradient_checkpointing=ckpt))
        torch.manual_seed(0)
        compute_losses(lens, _batch(lens), tau=1.0, alpha=1.0).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lens.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "frozen_base"])
def test_compiled_blocks_match_eager_and_none_falls_back(
    mode, narrow_llama_dir, caplog, monkeypatch
):
    """`train.compile`: the loss and gradients of eager mode, with no block left to eager."""
    # Dynamo's cache, which decides what falls back, is the same for every backend; aot_eager
    # (dynamo and autograd tracing without inductor's code generation) keeps this test fast.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    results = []
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for compiled in (False, True):
            lens = ConsistencyLens.build(_cfg(narrow_llama_dir, mode=mode, compile=compiled))
            for model in (lens.decoder.model, lens.encoder.model, lens.orig.model):
                blocks = find_parts(model).blocks
                wrapped = [hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks]
                assert wrapped == [compiled] * len(blocks)
            torch.manual_seed(0)
            out = compute_losses(lens, _batch(lens), tau=1.0, alpha=1.0)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in lens.named_parameters() if p.grad is not None}
            results.append((out.loss.detach(), grads))
            # A second step and a validation-like call (no grad, another batch size) add the
            # cache entries a run makes.
            compute_losses(lens, _batch(lens), tau=1.0, alpha=1.0).loss.backward()
            with torch.no_grad():
                compute_losses(lens, _batch(lens, lengths=(4, 7)), tau=1.0, alpha=1.0)
    # The blocks share one code object: at dynamo's default limit of 8 entries some of them ran
    # eager, which only this warning tells.
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    assert grads_c.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4)
