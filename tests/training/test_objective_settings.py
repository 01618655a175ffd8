"""An objective's own settings live beside it and are validated with the rest of the config."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_dump_config, tiny_train_config
from pydantic import Field

from consistency_lens import config as config_module
from consistency_lens.config import (
    LensConfig,
    ObjectiveSettings,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    objective_sections,
    register_settings,
)
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import trainer
from consistency_lens.training.objectives import (
    _REGISTRY,
    ObjectiveOutput,
    objective_class,
    register,
)
from consistency_lens.training.objectives.grpo import RLConfig
from consistency_lens.training.objectives.plan import PlanObjective, compute_losses
from consistency_lens.utils.logging import METRICS, MetricsFile

SHIPPED = Path(__file__).resolve().parents[2] / "consistency_lens" / "shipped"


@contextlib.contextmanager
def scaled_objective() -> Iterator[type]:
    """Register `scaled_plan`: the plan's loss times `train.scaled_plan.factor`, as a module of
    `training/objectives/` would (its settings class beside it); unregister it afterwards."""

    class ScaledSettings(ObjectiveSettings):
        factor: float = Field(1.0, gt=0)
        """Multiplier of the plan's loss."""

    @register("scaled_plan")
    class ScaledPlan(PlanObjective):
        settings_class = ScaledSettings
        terms = (*PlanObjective.terms, "factor")

        def __call__(self, lens, batch, step):
            out = compute_losses(lens, batch, step["tau"], step["alpha"])
            factor = torch.tensor(self.settings.factor)
            terms = {k: getattr(out, k) for k in PlanObjective.terms}
            return ObjectiveOutput(loss=out.loss * factor, terms={**terms, "factor": factor})

    try:
        yield ScaledPlan
    finally:
        _REGISTRY.pop("scaled_plan", None)
        config_module._SECTIONS.pop("scaled_plan", None)


def _error(overrides: list[str]) -> str:
    with pytest.raises(LensError) as err:
        load_config(None, overrides)
    return str(err.value)


def test_an_objectives_settings_are_validated_with_the_rest_of_the_config():
    with scaled_objective() as cls:
        assert cls.section == "scaled_plan"
        cfg = load_config(None, ["train.objective=scaled_plan", "train.scaled_plan.factor=3"])
        assert type(cfg.train.scaled_plan).__name__ == "ScaledSettings"
        assert cfg.train.scaled_plan.factor == 3.0
        assert cls.settings_of(cfg) is cfg.train.scaled_plan
        assert dump_config(cfg)["train"]["scaled_plan"] == {"factor": 3.0}
        # Defaults are there without a word of config, and a saved config reads back the same.
        assert LensConfig().train.scaled_plan.factor == 1.0
        assert config_from_dict(dump_config(cfg)) == cfg
        assert _error(["train.scaled_plan.factr=3"]) == (
            "Unknown config key 'train.scaled_plan.factr'; did you mean "
            "'train.scaled_plan.factor'? Allowed here: factor."
        )
        assert _error(["train.scaled_plan.factor=0"]) == (
            "Config key 'train.scaled_plan.factor': Input should be greater than 0 (got 0)."
        )
        assert _error(["train.scaled_plan=2"]).startswith("Config key 'train.scaled_plan': ")
    # Without the objective its section is an unknown key like any other.
    assert "scaled_plan" not in objective_sections()
    assert _error(["train.scaled_plan.factor=3"]).startswith(
        "Unknown config key 'train.scaled_plan'"
    )


def test_a_section_name_is_taken_once():
    class Other(ObjectiveSettings):
        x: int = 0

    with pytest.raises(ValueError, match="train.steps is taken"):
        register_settings("steps", Other)
    with pytest.raises(ValueError, match="train.rl is taken"):
        register_settings("rl", Other)
    assert objective_sections()["rl"] is RLConfig


def test_grpo_owns_its_settings_and_saved_configs_still_read():
    assert objective_class("grpo").settings_class is RLConfig
    assert "rl" not in TrainConfig.model_fields
    assert LensConfig().train.rl == RLConfig()
    # The lens shipped until 2026-12-04 saved `train.rl` as it was when `rl` was a field of
    # TrainConfig, before `prediction_reward` and `max_kl_ref` existed.
    old_rl = {
        "fluency_reward": 0.2,
        "kl_ref": 0.3,
        "mse_reward": 0.0,
        "samples": 8,
        "std_norm": True,
        "temperature": 1.0,
    }
    cfg = config_from_dict({"train": {"objective": "grpo", "rl": old_rl}})
    assert cfg.train.rl == RLConfig(**old_rl)
    # Settings added since read as their defaults, which change nothing.
    assert dump_config(cfg)["train"]["rl"] == {
        "prediction_reward": 0.0,
        "max_kl_ref": None,
        "fluency_margin": None,
        "next_reward": 0.0,
        "next_positions": None,
        **old_rl,
    }
    # The lens shipped now reads back to exactly the settings it saved, and the defaults of the
    # settings added after it (`next_reward`).
    saved = json.loads((SHIPPED / "smollm2-135m-sotu-pydoc-L20" / "lens_config.json").read_text())
    assert dump_config(config_from_dict(saved["config"]))["train"]["rl"] == {
        **saved["config"]["train"]["rl"],
        "next_reward": 0.0,
        "next_positions": None,
    }


def test_a_run_reads_its_objectives_settings_and_may_change_them_on_resume(
    tmp_path, tiny_llama_dir, corpus_dir
):
    base = tiny_dump_config(tmp_path, tiny_llama_dir, corpus_dir, num_samples=8, val_samples=4)
    dump_activations(config_from_dict(base))
    run_dir = tmp_path / "run"
    with scaled_objective():

        def cfg(factor: float, steps: int) -> LensConfig:
            train = tiny_train_config(run_dir, objective="scaled_plan", steps=steps)
            return config_from_dict({**base, "train": {**train, "scaled_plan": {"factor": factor}}})

        trainer.train(cfg(3.0, 1))
        row = next(r for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train")
        assert row["factor"] == 3.0
        assert row["loss"] == pytest.approx(3.0 * (row["loss_lm"] + row["alpha"] * row["loss_kl"]))
        checkpoint = ck.latest_valid(run_dir)
        assert ck.read_config(checkpoint)["train"]["scaled_plan"] == {"factor": 3.0}
        # An objective's own settings steer training, not what the weights mean.
        ck.check_resume_config(cfg(5.0, 2), checkpoint)
