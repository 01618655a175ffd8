"""Training end to end on a tiny model: each mode, bad batches, dump checks, exact resume."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import signal_after_step, tiny_dump_config, tiny_train_config
from safetensors.torch import load_file

from consistency_lens.config import LensConfig, config_from_dict
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import trainer
from consistency_lens.utils.logging import METRICS, MetricsFile


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny train/val dump of the tiny Llama; returns the base config dict."""
    base = tiny_dump_config(tmp_path_factory.mktemp("dump"), tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(base))
    return base


def _cfg(base: dict, run_dir: Path, **train) -> LensConfig:
    over = {"mode": "frozen_base", "max_bad_batches": 3, **train}
    return config_from_dict({**base, "train": tiny_train_config(run_dir, **over)})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "lens" / "lens.safetensors"))


@pytest.mark.parametrize("mode", ["full", "frozen_base", "lora"])
def test_one_step_in_each_mode(dumped, tmp_path, mode):
    run_dir = tmp_path / "run"
    result = trainer.train(_cfg(dumped, run_dir, mode=mode))
    assert result.steps == 1 and result.bad_batches == 0
    objective_terms = {f"val_{k}" for k in ("loss", "loss_kl", "loss_lm", "loss_mse", "entropy")}
    assert set(result.last_val) == {"val_kl", "val_mse", "val_fve"} | objective_terms
    records = MetricsFile(run_dir / METRICS).read()
    assert [(r["step"], r["kind"]) for r in records] == [(0, "val"), (1, "train"), (1, "val")]
    assert all(torch.isfinite(torch.tensor(r.get("loss", 0.0))) for r in records)
    ckpt = ck.load_checkpoint(ck.latest_valid(run_dir))
    assert ckpt.step == 1
    saved = _weights(run_dir)
    assert set(ckpt.trainable) == set(saved)
    assert all(torch.equal(ckpt.trainable[k], saved[k]) for k in saved)
    if mode != "full":
        # Only the small trainable parts are stored, never the frozen base.
        assert all(("lora_" in k) or ("proj" in k) or ("prompt" in k) for k in saved)
    with pytest.raises(LensError, match="already holds checkpoints; pass --resume"):
        trainer.train(_cfg(dumped, run_dir, mode=mode))


def _poison(monkeypatch, bad) -> None:
    original = ActivationDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if bad(i):
            item["A"] = torch.full_like(item["A"], float("nan"))
        return item

    monkeypatch.setattr(ActivationDataset, "__getitem__", getitem)


def test_nan_batch_is_skipped_and_counted(dumped, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda i: i == 0)
    run_dir = tmp_path / "run"
    # 6 micro-batches make one epoch, so the batch holding sample 0 is met.
    result = trainer.train(_cfg(dumped, run_dir, steps=6, val_every=6, ckpt_every=6))
    assert result.steps == 6 and result.bad_batches >= 1
    last = [r for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train"][-1]
    assert last["bad_batches"] == result.bad_batches
    assert all(torch.isfinite(v).all() for v in _weights(run_dir).values())


def test_persistent_nan_stops_with_step_and_cause(dumped, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda i: True)
    with pytest.raises(LensError, match=r"stopped at step 1: 3 consecutive .* NaN/inf"):
        trainer.train(_cfg(dumped, tmp_path / "run"))


def test_missing_dump_says_to_run_dump(dumped, tmp_path):
    base = {**dumped, "output_dir": str(tmp_path / "nothing")}
    with pytest.raises(LensError, match="run `consistency-lens dump` with the same config"):
        trainer.train(_cfg(base, tmp_path / "run"))


def test_width_mismatch_is_named(dumped, tmp_path, narrow_llama_dir):
    from conftest import split_of

    narrow = narrow_llama_dir
    wide, thin = (
        _cfg(dumped, tmp_path / "a"),
        _cfg({**dumped, "model": str(narrow)}, tmp_path / "b"),
    )
    for split in ("train", "val"):
        shutil.copytree(split_of(wide, split), split_of(thin, split))
    with pytest.raises(LensError, match="activations of width 64 but model .* has width 32"):
        trainer.train(thin)


def _train_records(run_dir: Path) -> list[dict]:
    drop = {"time", "samples_per_s"}
    records = MetricsFile(run_dir / METRICS).read()
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_sigterm_then_resume_equals_uninterrupted_run(dumped, tmp_path, monkeypatch, caplog):
    # 4 steps x 2 micro-batches of 4 cross the 6-batch epoch boundary; EMA rides along.
    over = dict(mode="full", steps=4, grad_accum=2, val_every=2, ckpt_every=2, ema_decay=0.5)
    straight = tmp_path / "straight"
    trainer.train(_cfg(dumped, straight, **over))

    resumed = tmp_path / "resumed"
    step = signal_after_step(monkeypatch, signal.SIGTERM, step=3)
    with pytest.raises(LensError, match="SIGTERM at step 3"):
        trainer.train(_cfg(dumped, resumed, **over))
    assert ck.latest_valid(resumed).name == "step_3"
    assert not (resumed / "lens").exists()
    # A copy whose newest checkpoint is bit-flipped must fall back to step 2 and still agree.
    fallback = tmp_path / "fallback"
    shutil.copytree(resumed, fallback)
    weights = fallback / "checkpoints" / "step_3" / ck.TRAINABLE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(trainer, "_train_step", step)
    trainer.train(_cfg(dumped, resumed, **over), resume=True)
    with caplog.at_level(logging.WARNING, logger="consistency_lens"):
        trainer.train(_cfg(dumped, fallback, **over), resume=True)
    assert "Skipping corrupt checkpoint" in caplog.text and "step_3" in caplog.text

    a, b = _weights(straight), _weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(str(straight / "lens_ema" / "lens.safetensors"))
    ema_b = load_file(str(resumed / "lens_ema" / "lens.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert _train_records(straight) == _train_records(resumed)
    c = _weights(fallback)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert _train_records(straight) == _train_records(fallback)


def test_resume_with_another_mode_is_refused(dumped, tmp_path):
    run_dir = tmp_path / "run"
    trainer.train(_cfg(dumped, run_dir))
    with pytest.raises(LensError, match="train.mode='frozen_base' but the config says"):
        trainer.train(_cfg(dumped, run_dir, mode="lora", steps=2), resume=True)


def _cli(base: dict, run_dir: Path, steps: int, *flags: str) -> list[str]:
    overrides = [f"{k}={v}" for k, v in base.items()] + [
        f"train.run_dir={run_dir}",
        "train.t_text=2",
        "train.batch_size=4",
        f"train.steps={steps}",
        "train.val_every=100000",
        "train.ckpt_every=100000",
        "train.log_every=1",
        "train.prompt=A <embed> is",
    ]
    return [sys.executable, "-m", "consistency_lens", "train", *overrides, *flags]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cli_sigterm_checkpoints_and_resume_continues(dumped, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(dumped, run_dir, 100000),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,
    )
    deadline = time.monotonic() + 120
    while not [r for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train"]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "SIGTERM" in err and "--resume" in err
    step = ck.load_checkpoint(ck.latest_valid(run_dir)).step
    assert step >= 1
    done = subprocess.run(
        _cli(dumped, run_dir, step + 1, "--resume"),
        capture_output=True,
        text=True,
        timeout=120,
        env=_ENV,
    )
    assert done.returncode == 0, done.stderr
    assert "Resuming from" in done.stderr and f"(step {step})" in done.stderr
    assert ck.latest_valid(run_dir).name == f"step_{step + 1}"
    assert (run_dir / "lens" / "lens.safetensors").is_file()


def test_trainer_logs_every_term_the_objective_returns(dumped, tmp_path):
    from consistency_lens.training.objectives import _REGISTRY, ObjectiveOutput, register
    from consistency_lens.training.objectives.plan import PlanObjective

    @register("test_extra_term")
    class WithExtra(PlanObjective):
        def __call__(self, lens, batch, step):
            out = super().__call__(lens, batch, step)
            extra = out.terms["loss_kl"] * 2  # returned but not declared in `terms`
            return ObjectiveOutput(out.loss, {**out.terms, "undeclared": extra})

    try:
        run_dir = tmp_path / "run"
        result = trainer.train(_cfg(dumped, run_dir, objective="test_extra_term"))
        assert result.last_val["val_undeclared"] == pytest.approx(
            2 * result.last_val["val_loss_kl"]
        )
        train_rows = [r for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train"]
        assert train_rows[0]["undeclared"] == pytest.approx(2 * train_rows[0]["loss_kl"])
        assert {"tau", "alpha"} <= set(train_rows[0])  # the declared coefficients
    finally:
        _REGISTRY.pop("test_extra_term", None)


# A valid value other than the tiny run's for every weight-defining setting.
_CHANGED = {
    "model": "other/model",
    "revision": "v2",
    "layer": 2,
    "train.mode": "full",
    "train.t_text": 3,
    "train.prompt": "B <embed> is",
    "train.inject_layer": 0,
    "train.encoder_prompt": "a note",
    "train.encoder_layer": 0,
    "train.encoder_rotate": 1,
    "train.decoder_rotate": 1,
    "train.lora_r": 4,
    "train.lora_alpha": 8,
}


def _changed(base: dict, run_dir: Path, key: str, value: object) -> LensConfig:
    data = {**base, "train": tiny_train_config(run_dir, mode="frozen_base", steps=2)}
    section, _, name = key.rpartition(".")
    (data[section] if section else data)[name] = value
    if key == "train.decoder_rotate":
        # Refused with the tiny run's `plan` objective; the objective is not weight-defining.
        data["train"]["objective"] = "grpo"
    return config_from_dict(data)


@pytest.fixture(scope="module")
def interrupted(dumped, tmp_path_factory) -> Path:
    """A run stopped after its first checkpoint (step 1 of 2)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    trainer.train(_cfg(dumped, run_dir))
    return run_dir


def test_every_weight_defining_setting_has_a_resume_case():
    from consistency_lens.config import WEIGHT_KEYS

    assert sorted(_CHANGED) == sorted(WEIGHT_KEYS)


@pytest.mark.parametrize("key", sorted(_CHANGED))
def test_resume_with_a_weight_defining_setting_changed_is_refused(dumped, interrupted, key):
    cfg = _changed(dumped, interrupted, key, _CHANGED[key])
    checkpoint = ck.latest_valid(interrupted)
    old = ck.read_config(checkpoint)
    section, _, name = key.rpartition(".")
    was = (old[section] if section else old)[name]
    with pytest.raises(LensError) as err:
        trainer.train(cfg, resume=True)
    assert str(err.value) == (
        f"Cannot resume from '{checkpoint}': it was trained with {key}={was!r} but "
        f"the config says {key}={_CHANGED[key]!r}; use the same config or a new train.run_dir."
    )


@pytest.mark.parametrize("now", [0, None])
def test_resume_with_inject_layer_changed_or_dropped_is_refused(dumped, tmp_path, now):
    run_dir = tmp_path / "run"
    trainer.train(_cfg(dumped, run_dir, inject_layer=1))
    with pytest.raises(
        LensError, match=f"train.inject_layer=1 but the config says train.inject_layer={now}"
    ):
        trainer.train(_cfg(dumped, run_dir, inject_layer=now, steps=2), resume=True)
