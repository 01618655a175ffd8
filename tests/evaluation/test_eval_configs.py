"""The shipped config files: complete, valid, and the demo sized as documented."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel

from consistency_lens.config import LensConfig, config_fields, load_config

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, kind in config_fields(model).items():
        out.add(prefix + name)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= _keys(kind, f"{prefix}{name}.")
    return out


def _yaml_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _yaml_keys(value, f"{prefix}{key}.")
    return out


def test_lens_yaml_documents_every_key():
    data = yaml.safe_load((CONFIG / "lens.yaml").read_text())
    assert _yaml_keys(data) == _keys(LensConfig)
    load_config([CONFIG / "lens.yaml"])


def test_demo_and_wandb_configs_validate():
    cfg = load_config([CONFIG / "demo.yaml", CONFIG / "wandb.yaml"])
    assert cfg.model == "smollm2-135m" and cfg.corpus == "sotu"
    assert cfg.train.mode == "lora" and 4 <= cfg.train.t_text <= 8
    assert 10 <= cfg.layer <= 25
    # The readable-lens recipe: hidden-state injection, warm start, then GRPO.
    assert cfg.train.inject_layer is not None and cfg.train.objective == "grpo"
    assert cfg.train.warm_start.steps > 0
    assert cfg.wandb.enabled is False and cfg.wandb.mode == "offline"


def test_gpu_config_validates_and_uses_the_same_recipe():
    demo = load_config([CONFIG / "demo.yaml"])
    gpu = load_config([CONFIG / "gpu.yaml"])
    assert gpu.device == "cuda" and gpu.train.precision == "bf16"
    keys = ("mode", "inject_layer", "prompt", "encoder_prompt", "encoder_rotate", "objective")
    for key in (*keys, "t_text"):
        assert getattr(gpu.train, key) == getattr(demo.train, key)
    for key in ("temperature", "kl_ref"):
        assert getattr(gpu.train.rl, key) == getattr(demo.train.rl, key)
    # Both lenses write the best of 18 texts, one written from M's prediction from A alone
    # (BENCHMARKS.md, "Naming M's prediction from A alone").
    assert gpu.decode == demo.decode
    assert demo.decode.filled().samples == 16 and demo.decode.filled().prediction == 3.0
    # The fluency weight is tuned per scale (BENCHMARKS.md, "The recipe on one GPU").
    assert demo.train.rl.fluency_reward > 0 and gpu.train.rl.fluency_reward > 0
    assert gpu.num_samples > demo.num_samples and gpu.train.warm_start.steps > 0


def test_deepspeed_config_is_zero2_bf16():
    ds = yaml.safe_load((CONFIG / "ds_stage2.yaml").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] > 0
