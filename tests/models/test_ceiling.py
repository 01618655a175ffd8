"""The context ceiling kept beside a lens: saved from another lens's E, reloaded exactly, refused
when damaged or unfitting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.models.ceiling import (
    CEILING_CONFIG,
    CEILING_WEIGHTS,
    ceiling_dir,
    ceiling_from_lens,
    load_ceiling,
)
from consistency_lens.models.lens import ConsistencyLens


def _cfg(model_dir, **train) -> LensConfig:
    train = {"t_text": 3, "mode": "lora", "encoder_prompt": "In short:", **train}
    return LensConfig(
        model=str(model_dir), device="cpu", model_dtype="float32", layer=1, train=train
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("ceiling")
    torch.manual_seed(0)
    lens = ConsistencyLens.build(_cfg(tiny_llama_dir))
    lens.save_pretrained(root / "lens")
    # The ceiling's source: a lens of the same shape whose E has other weights (a warm start's).
    source = ConsistencyLens.build(_cfg(tiny_llama_dir), loaded=lens.loaded)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in source.trainable_parameters().values():
            param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=gen))
    source.save_pretrained(root / "source")
    ceiling_from_lens(root / "source", root / "lens")
    return root, lens, source


def test_the_ceiling_is_the_source_e_and_reloads_exactly(saved):
    root, lens, source = saved
    files = sorted(p.name for p in ceiling_dir(root / "lens").iterdir())
    assert files == [CEILING_CONFIG, CEILING_WEIGHTS]
    stored = load_file(str(ceiling_dir(root / "lens") / CEILING_WEIGHTS))
    want = {
        n[len("encoder.") :]: p for n, p in source.trainable_parameters().items() if "encoder." in n
    }
    # Only E's weights: none of the source's D.
    assert stored.keys() == want.keys() and want
    twin, meta = load_ceiling(lens, root / "lens")
    got = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (meta["t_text"], meta["layer"], meta["mode"], meta["lora_r"]) == (3, 1, "lora", 8)
    assert meta["encoder_prompt"] == "In short:"
    # The twin shares the frozen base and has its own trainable weights; the lens's E is untouched.
    frozen = next(p for p in twin.parameters() if not p.requires_grad)
    assert any(frozen is p for p in lens.encoder.parameters())
    assert not torch.equal(lens.encoder.proj.weight, twin.proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(twin.encode_ids(ids), source.encoder.encode_ids(ids))


def _copy(saved_root, tmp_path):
    out = tmp_path / "lens"
    shutil.copytree(saved_root / "lens", out)
    return out, ceiling_dir(out) / CEILING_CONFIG


def test_a_damaged_or_unfitting_ceiling_is_refused(saved, tmp_path):
    root, lens, _ = saved
    assert load_ceiling(lens, tmp_path / "no_lens_here") is None
    out, config = _copy(root, tmp_path)
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "t_text": 5}))
    with pytest.raises(LensError, match="differs in t_text.*train-ceiling"):
        load_ceiling(lens, out)
    config.write_text(json.dumps({**meta, "fingerprint": "other"}))
    with pytest.raises(LensError, match="differs in fingerprint"):
        load_ceiling(lens, out)
    config.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(LensError, match="format version 99"):
        load_ceiling(lens, out)
    config.write_text(json.dumps(meta))
    (ceiling_dir(out) / CEILING_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(LensError, match="checksum mismatch"):
        load_ceiling(lens, out)


def test_an_e_of_another_shape_is_never_kept_as_a_ceiling(saved, tmp_path, tiny_llama_dir):
    root, lens, _ = saved
    other = ConsistencyLens.build(_cfg(tiny_llama_dir, t_text=2), loaded=lens.loaded)
    other.save_pretrained(tmp_path / "t2")
    out, _ = _copy(root, tmp_path)
    shutil.rmtree(ceiling_dir(out))
    with pytest.raises(LensError, match="differ in t_text.*train-ceiling --checkpoint"):
        ceiling_from_lens(tmp_path / "t2", out)
    assert not ceiling_dir(out).exists()


def test_the_shipped_lens_keeps_a_ceiling_that_fits_its_encoder():
    """Checked on the files alone (no model load): the same base, layer, T_text and E shape."""
    from consistency_lens.models.embedded import ALIAS
    from consistency_lens.shipped import shipped_lens
    from consistency_lens.utils.io import sha256_file

    lens_dir = shipped_lens(ALIAS)
    lens_meta = json.loads((lens_dir / "lens_config.json").read_text())
    meta = json.loads((ceiling_dir(lens_dir) / CEILING_CONFIG).read_text())
    for key in ("fingerprint", "layer", "encoder_layer", "d_model", "t_text", "mode"):
        assert meta[key] == lens_meta[key], key
    weights = ceiling_dir(lens_dir) / CEILING_WEIGHTS
    assert meta["weights_sha256"] == sha256_file(weights)
    own = {
        k[len("encoder.") :]: v
        for k, v in load_file(str(lens_dir / "lens.safetensors")).items()
        if k.startswith("encoder.")
    }
    stored = load_file(str(weights))
    assert stored.keys() == own.keys()
    assert all(stored[k].shape == own[k].shape for k in own)
    # Trained on the true context tokens alone, so not the lens's own E.
    assert any(not torch.equal(stored[k], own[k]) for k in own)
    assert meta["trained"]["objective"] == "context_ceiling"
