"""Nothing the program loads can run code: planted pickles are refused, remote code is opt-in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, tiny_dump_config, tiny_train_config

from consistency_lens.config import config_from_dict
from consistency_lens.data import corpus as corpus_mod
from consistency_lens.errors import LensError
from consistency_lens.models import loading
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import trainer
from consistency_lens.utils.io import sha256_file


class _Evil:
    """Unpickling this runs `touch <target>`."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny dump and a 1-step run (checkpoint + saved lens); returns the config dict."""
    from consistency_lens.data.dump import dump_activations

    root = tmp_path_factory.mktemp("safe_loading")
    base = tiny_dump_config(
        root,
        tiny_llama_dir,
        corpus_dir,
        seq_len=24,
        p_min=3,
        num_samples=16,
        train=tiny_train_config(root / "run"),
    )
    cfg = config_from_dict(base)
    dump_activations(cfg)
    trainer.train(cfg)
    return base


def _overrides(base: dict, run_dir: Path, steps: int) -> list[str]:
    flat = {k: v for k, v in base.items() if k != "train"}
    flat.update({f"train.{k}": v for k, v in base["train"].items()})
    flat.update({"train.run_dir": run_dir, "train.steps": steps})
    return [f"{k}={v}" for k, v in flat.items()]


def test_pickle_planted_as_checkpoint_state_is_refused_by_resume(trained, tmp_path, capsys):
    # tests/utils/test_checkpoint.py refuses it in load_checkpoint; this goes through `train --resume`.
    run_dir = tmp_path / "run"
    shutil.copytree(Path(trained["train"]["run_dir"]) / "checkpoints", run_dir / "checkpoints")
    path = ck.latest_valid(run_dir)
    marker = tmp_path / "pwned"
    state = ck.load_state(path / ck.STATE)
    torch.save({**state, "payload": _Evil(marker)}, path / ck.STATE)
    # The attacker also fixes the checksum, so only weights_only loading stands in the way.
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["files"][ck.STATE] = sha256_file(path / ck.STATE)
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    line = cli_error(capsys, ["train", *_overrides(trained, run_dir, 2), "--resume"])
    assert "Refusing to load checkpoint state" in line and "weights_only=True" in line
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "explain"])
def test_pickle_planted_as_lens_weights_is_refused(trained, tmp_path, capsys, command):
    lens = tmp_path / "lens"
    shutil.copytree(Path(trained["train"]["run_dir"]) / "lens", lens)
    marker = tmp_path / "pwned"
    torch.save({"decoder.proj.weight": _Evil(marker)}, lens / "lens.safetensors")
    argv = [command, *_overrides(trained, tmp_path / "run", 1), "--checkpoint", str(lens)]
    line = cli_error(capsys, argv + (["--text", "the nation"] if command == "explain" else []))
    assert "lens.safetensors' are corrupt" in line
    assert not marker.exists()
    with pytest.raises(LensError, match="are corrupt"):
        ConsistencyLens.from_pretrained(lens)
    assert not marker.exists()


def test_pickle_planted_in_the_corpus_cache_is_refused(trained, tmp_path, tiny_llama_dir):
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache_dir"], cache)
    (entry,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    marker = tmp_path / "pwned"
    with open(entry / "tokens_00000.npy", "wb") as handle:
        np.save(handle, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    tokenizer = loading.load_tokenizer(str(tiny_llama_dir))
    with pytest.raises(LensError, match="corrupt or holds non-numeric data") as err:
        corpus_mod.tokenized_corpus(trained["corpus"], tokenizer, cache)
    assert "\n" not in str(err.value) and not marker.exists()


def _spy_remote_code(monkeypatch) -> list[bool]:
    seen: list[bool] = []
    for cls in (loading.AutoModelForCausalLM, loading.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


def test_remote_code_is_off_unless_the_config_turns_it_on(trained, monkeypatch):
    seen = _spy_remote_code(monkeypatch)
    loading.load_model(trained["model"], device="cpu", dtype="float32")
    assert seen == [False, False]
    seen.clear()
    ConsistencyLens.build(config_from_dict(trained))
    assert seen == [False, False]
    seen.clear()
    lens_dir = Path(trained["train"]["run_dir"]) / "lens"
    ConsistencyLens.from_pretrained(lens_dir)  # the saved config has the default
    assert seen == [False, False]
    seen.clear()
    ConsistencyLens.build(config_from_dict({**trained, "trust_remote_code": True}))
    assert seen == [True, True]


def test_planted_dcp_metadata_is_refused_without_running(tmp_path):
    """Sharded checkpoints: DCP's `.metadata` is a pickle; ours admits only DCP's own classes.

    Worst case: the manifest checksum is forged too, so only the restricted unpickler stands.
    """
    import pickle

    import torch.distributed.checkpoint as dcp

    good = tmp_path / "good"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3}
    dcp.save(state, checkpoint_id=good)
    target = {"model": {"w": torch.zeros(2, 3)}, "step": 0}
    ck.dcp_load(target, good)  # a real DCP checkpoint still loads through the safe reader/planner
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["step"] == 3

    marker = tmp_path / "pwned"
    (good / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(LensError, match="unsafe or corrupt metadata"):
        ck.dcp_load({"model": {"w": torch.zeros(2, 3)}}, good)
    assert not marker.exists()


def _global_call_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling `module:name(arg)`; protocol 4 resolves dotted names."""
    import pickle

    def text(s: str) -> bytes:
        data = s.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data

    return (
        pickle.PROTO
        + b"\x04"
        + text(module)
        + text(name)
        + pickle.STACK_GLOBAL
        + text(arg)
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.distributed.checkpoint.filesystem", "os.system"),  # dotted name in a DCP module
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__.__globals__"),
        ("torch", "load"),  # under an admitted module, but not an admitted name
        ("os", "system"),
    ],
)
def test_dcp_metadata_admits_only_exact_pairs(tmp_path, module, name):
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(_global_call_pickle(module, name, f"touch {marker}"))
    with pytest.raises(LensError, match="unsafe or corrupt metadata") as err:
        ck.dcp_load({"w": torch.zeros(2)}, path)
    assert f"{module}:{name}" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_dotted_name_dcp_payload_through_train_resume_runs_nothing(trained, tmp_path, capsys):
    """Single-process `train --resume` loads through DCP when a (forged) manifest says sharded."""
    run_dir = tmp_path / "run"
    shutil.copytree(Path(trained["train"]["run_dir"]) / "checkpoints", run_dir / "checkpoints")
    path = ck.latest_valid(run_dir)
    marker = tmp_path / "pwned"
    payload = _global_call_pickle(
        "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"
    )
    (path / ".metadata").write_bytes(payload)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["kind"] = ck.SHARDED
    manifest["files"][".metadata"] = sha256_file(path / ".metadata")
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    line = cli_error(capsys, ["train", *_overrides(trained, run_dir, 2), "--resume"])
    assert "unsafe or corrupt metadata" in line and "os.system" in line
    assert not marker.exists()


def _model_with_remote_code(src: Path, out: Path, marker: Path) -> Path:
    """A copy of `src` whose config.json maps AutoConfig to a module that touches `marker`."""
    shutil.copytree(src, out)
    (out / "evil_config.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).touch()\n"
        "class EvilConfig(LlamaConfig):\n"
        "    pass\n"
    )
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def _edit_lens(trained: dict, out: Path, **meta_or_config) -> Path:
    shutil.copytree(Path(trained["train"]["run_dir"]) / "lens", out)
    meta = json.loads((out / "lens_config.json").read_text())
    for key, value in meta_or_config.items():
        if key == "trust_remote_code":
            meta["config"][key] = value
        else:
            meta[key] = meta["config"]["model"] = value
    (out / "lens_config.json").write_text(json.dumps(meta))
    return out


def test_lens_config_never_turns_remote_code_on(trained, tmp_path, tiny_llama_dir, capsys):
    """A lens saying trust_remote_code=true and naming a model with an auto_map runs nothing."""
    marker = tmp_path / "pwned"
    evil = _model_with_remote_code(tiny_llama_dir, tmp_path / "evil_model", marker)
    lens = _edit_lens(trained, tmp_path / "lens", base_model=str(evil), trust_remote_code=True)
    over = [*_overrides(trained, tmp_path / "run", 1), "trust_remote_code=false"]
    argv = ["explain", *over, "--checkpoint", str(lens), "--text", "the nation"]
    line = cli_error(capsys, argv)
    assert "with trust_remote_code=true" in line and str(evil) in line
    with pytest.raises(LensError, match="with trust_remote_code=true"):
        ConsistencyLens.from_pretrained(lens)
    assert not marker.exists()


def test_lens_base_model_must_be_the_configs(trained, tmp_path, tiny_llama_dir, capsys):
    """Even a user who trusts their own model's code never gets the lens's model loaded instead."""
    marker = tmp_path / "pwned"
    evil = _model_with_remote_code(tiny_llama_dir, tmp_path / "evil_model", marker)
    lens = _edit_lens(trained, tmp_path / "lens", base_model=str(evil))
    over = [*_overrides(trained, tmp_path / "run", 1), "trust_remote_code=true"]
    line = cli_error(capsys, ["eval", *over, "--checkpoint", str(lens)])
    assert f"trained on base model '{evil}'" in line and f"model '{trained['model']}'" in line
    assert f"set model={evil}" in line
    assert not marker.exists()
