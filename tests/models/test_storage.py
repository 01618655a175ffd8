"""A saved lens stored in bf16: the weights on disk are exactly the bf16 rounding of the fp32
ones, the lens and its context ceiling load with those values and valid checksums, the stale
eval numbers are gone, and a bad dtype or a value float16 cannot hold changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_error
from safetensors.torch import load_file

from consistency_lens.cli import main
from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.evaluation.commands import card_command
from consistency_lens.models.ceiling import ceiling_dir, ceiling_from_lens, load_ceiling
from consistency_lens.models.lens import ConsistencyLens, check_lens_dir
from consistency_lens.models.storage import store_weights_as


def _saved(root: Path, model_dir: Path, scale: float = 0.01) -> tuple[ConsistencyLens, Path]:
    """A tiny lens with nudged weights (not bf16-exact), its context ceiling and a stale card."""
    cfg = LensConfig(
        model=str(model_dir), device="cpu", model_dtype="float32", layer=1, train={"t_text": 2}
    )
    torch.manual_seed(0)
    lens = ConsistencyLens.build(cfg)
    with torch.no_grad():
        for param in lens.trainable_parameters().values():
            param.add_(torch.randn_like(param) * scale)
    lens.train_mean = torch.randn(lens.d_model)
    path = root / "lens"
    lens.save_pretrained(path)
    ceiling_from_lens(path, path)
    results = json.dumps({"lens_weights_sha256": check_lens_dir(path)["weights_sha256"]})
    (root / "results.json").write_text(results)
    (path / "eval_results.json").write_text(results)  # as `card` leaves them
    with (path / "README.md").open("a") as card:
        card.write("\n## Evaluation\n\nnumbers of the fp32 weights\n")
    return lens, path


def test_bf16_weights_are_the_rounded_fp32_ones_and_load(tmp_path, tiny_llama_dir):
    lens, path = _saved(tmp_path, tiny_llama_dir)
    fp32 = {k: v.detach().clone() for k, v in lens.trainable_parameters().items()}
    ceiling_fp32 = load_file(str(ceiling_dir(path) / "encoder.safetensors"))
    mean_bytes = (path / "train_mean.safetensors").read_bytes()
    assert (path / "eval_results.json").is_file()

    rewritten = store_weights_as(path, "bfloat16")

    assert [p.name for p in rewritten] == ["lens.safetensors", "encoder.safetensors"]
    stored = load_file(str(path / "lens.safetensors"))
    assert set(stored) == set(fp32)
    for name, value in fp32.items():
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], value.to(torch.bfloat16))
    assert any(not torch.equal(stored[n].float(), v) for n, v in fp32.items())  # really rounded
    loaded = ConsistencyLens.from_pretrained(path, device="cpu")  # checksum checked on load
    for name, param in loaded.trainable_parameters().items():
        assert param.dtype == torch.float32  # fp32 masters, holding the bf16 values
        assert torch.equal(param, fp32[name].to(torch.bfloat16).float())
    # The training mean is no weight: it stays float32, byte for byte.
    assert (path / "train_mean.safetensors").read_bytes() == mean_bytes
    assert torch.equal(loaded.train_mean, lens.train_mean)
    twin, _ = load_ceiling(loaded, path)
    own = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    for name, value in ceiling_fp32.items():
        assert torch.equal(own[name], value.to(torch.bfloat16).float())
    # The card's numbers were computed on the fp32 weights: gone, and `card` refuses them.
    assert not (path / "eval_results.json").exists()
    assert "## Evaluation" not in (path / "README.md").read_text()
    with pytest.raises(LensError, match="were not computed on the weights"):
        card_command(path, tmp_path / "results.json")
    assert store_weights_as(path, "bfloat16") == []  # already bf16: nothing rewritten


def test_refusals_change_nothing(tmp_path, tiny_llama_dir, capsys):
    _, path = _saved(tmp_path, tiny_llama_dir, scale=1e6)  # beyond float16's 65504
    before = {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    with pytest.raises(LensError, match="beyond float16's range; store them as bfloat16"):
        store_weights_as(path, "float16")
    with pytest.raises(LensError, match="Unknown dtype 'int8'"):
        store_weights_as(path, "int8")
    line = cli_error(capsys, ["cast", str(tmp_path / "nowhere"), "--dtype", "bfloat16"])
    assert "No saved lens at" in line
    assert {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} == before


def test_the_cast_command(tmp_path, tiny_llama_dir, capsys):
    _, path = _saved(tmp_path, tiny_llama_dir)
    main(["cast", str(path), "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "stored as bfloat16" in out and "consistency-lens eval --checkpoint" in out
    check_lens_dir(path)
    main(["cast", str(path), "--dtype", "bfloat16"])
    assert "already bfloat16" in capsys.readouterr().out
