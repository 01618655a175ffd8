"""The context ceiling's training: the E-only objective, the warm start's E kept beside the lens,
and `train-ceiling` for a lens without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_e_alone_learns, cli_error, tiny_dump_config
from safetensors.torch import load_file

from consistency_lens.cli import main
from consistency_lens.config import LensConfig, config_from_dict, load_config
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.models.ceiling import (
    CEILING_CONFIG,
    CEILING_WEIGHTS,
    ceiling_dir,
)
from consistency_lens.models.lens import CONFIG_FILE, ConsistencyLens
from consistency_lens.training import trainer
from consistency_lens.training.objectives import build_objective, normalised_mse, step_info


def _lens(model_dir, **train) -> ConsistencyLens:
    cfg = LensConfig(
        model=str(model_dir),
        device="cpu",
        model_dtype="float32",
        layer=1,
        seed=0,
        train={"t_text": 3, "mode": "lora", "mse_weight": 2.0, "objective": "context_ceiling"}
        | train,
    )
    torch.manual_seed(0)
    return ConsistencyLens.build(cfg)


@pytest.mark.parametrize("rotate", [0, 2])
def test_ceiling_objective_reads_the_true_last_tokens_and_trains_e_only(tiny_llama_dir, rotate):
    """In order, even where the lens's E reads its texts rotated (`train.encoder_rotate`)."""
    lens = _lens(tiny_llama_dir, alpha={"kind": "constant", "start": 0.0}, encoder_rotate=rotate)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 320, (n,), generator=gen) for n in (7, 2, 5)]
    items = []
    for ids in seqs:
        act = lens.orig.activations(ids[None], torch.ones_like(ids[None]))[0]
        items.append({"input_ids_A": ids, "A": act, "input_ids_A_prime": ids, "A_prime": act})
    batch = CollateFn(pad_id=0)(items)
    objective = build_objective(lens, lens.cfg)
    out = objective(lens, batch, step_info(type(objective), lens.cfg, 0))
    # By hand: each sample alone, unpadded, its last 3 tokens (the 2-token one: both).
    with torch.no_grad():
        hand = torch.cat([lens.encoder.encode_ids(ids[None, -3:], rotate=0) for ids in seqs])
        as_own = torch.cat([lens.encoder.encode_ids(ids[None, -3:]) for ids in seqs])
    assert torch.equal(as_own, hand) == (rotate == 0)
    mse = normalised_mse(hand, batch.A.float())
    assert float(out.terms["mse_e"].detach()) == pytest.approx(float(mse), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(2.0 * float(mse), rel=1e-5)
    assert float(out.terms["kl_e"].detach()) == 0.0  # alpha 0: M's patched forward is skipped
    # Validation scores the same Â: E on the true tokens, never D's text.
    with torch.no_grad():
        torch.testing.assert_close(objective.reconstruct(lens, batch), hand, rtol=1e-4, atol=1e-5)
        assert not torch.equal(hand, lens.reconstruct(batch.A)[1])
    assert_e_alone_learns(lens, objective, batch, out, mse_weight=2.0)


def test_ceiling_objective_refuses_a_strategy(tiny_llama_dir):
    # D's weights are trainable but unused: DDP would wait forever for their gradients.
    lens = _lens(tiny_llama_dir)
    cfg = lens.cfg.model_copy(
        update={"distributed": lens.cfg.distributed.model_copy(update={"strategy": "ddp"})}
    )
    with pytest.raises(LensError, match="context_ceiling trains E alone in one process"):
        build_objective(lens, cfg)


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny train/val dump of the tiny Llama (with 2 tokens after P)."""
    base = tiny_dump_config(tmp_path_factory.mktemp("dump"), tiny_llama_dir, corpus_dir)
    base["train"] = {"t_text": 2}
    dump_activations(config_from_dict(base))
    return base


def _overrides(base: dict, run_dir: Path, objective: str, steps: int, **extra) -> list[str]:
    train = {
        "run_dir": run_dir,
        "objective": objective,
        "mode": "lora",
        "inject_layer": 0,
        "t_text": 2,
        "steps": steps,
        "batch_size": 4,
        "val_every": 1,
        "val_batches": 1,
        "ckpt_every": 1,
        "log_every": 1,
        "mse_weight": 1.0,
        "lr_schedule.kind": "constant",
        "lr_schedule.warmup_steps": 0,
        "rl.samples": 2,
        "prompt": '"A <embed> is"',
        **extra,
    }
    top = [f"{k}={v}" for k, v in base.items() if k != "train"]
    return top + [f"train.{k}={v}" for k, v in train.items()]


def _encoder_weights(lens_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(lens_dir / "lens.safetensors"))
    return {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}


def test_train_keeps_the_warm_start_e_as_the_ceiling(dumped, tmp_path):
    run_dir = tmp_path / "run"
    args = _overrides(dumped, run_dir, "grpo", 1, **{"warm_start.steps": 2})
    result = trainer.train(load_config(None, args))
    ceiling = ceiling_dir(result.lens_dir)
    saved = load_file(str(ceiling / CEILING_WEIGHTS))
    warm = _encoder_weights(run_dir / trainer.WARM_START_DIR / "lens")
    assert saved.keys() == warm.keys() and all(torch.equal(saved[k], warm[k]) for k in warm)
    # The lens's own E moved on in GRPO; the ceiling is the warm start's, not the lens's.
    own = _encoder_weights(result.lens_dir)
    assert any(not torch.equal(own[k], warm[k]) for k in warm)
    meta = json.loads((ceiling / CEILING_CONFIG).read_text())
    assert meta["trained"]["objective"] == "warm_start" and meta["trained"]["steps"] == 2
    assert (meta["t_text"], meta["layer"], meta["mode"]) == (2, 1, "lora")


@pytest.mark.parametrize(
    ("objective", "rotate"), [("warm_start_next", 0), ("warm_start_predict", 0), ("warm_start", 1)]
)
def test_another_warm_start_gets_a_fresh_ceiling_with_its_budget(
    dumped, tmp_path, objective, rotate
):
    """A warm start whose E never read the context alone, in order (the next tokens, M's
    continuation, the context rotated by `train.encoder_rotate`) gets a fresh E trained on the
    true last tokens, with the warm start's steps, as its ceiling; it reads them unrotated."""
    extra = {"warm_start.steps": 2, "warm_start.objective": objective, "encoder_rotate": rotate}
    run_dir = tmp_path / "r"
    result = trainer.train(load_config(None, _overrides(dumped, run_dir, "grpo", 1, **extra)))
    ceiling = ceiling_dir(result.lens_dir)
    meta = json.loads((ceiling / CEILING_CONFIG).read_text())
    assert meta["trained"]["objective"] == "context_ceiling" and meta["trained"]["steps"] == 2
    assert meta["trained"]["alpha"] == 0.0
    saved = load_file(str(ceiling / CEILING_WEIGHTS))
    trained = _encoder_weights(run_dir / trainer.CEILING_RUN_DIR / "lens")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    warm = _encoder_weights(run_dir / trainer.WARM_START_DIR / "lens")
    assert any(not torch.equal(saved[k], warm[k]) for k in saved)  # not the warm start's E
    ceiling_run = json.loads((run_dir / trainer.CEILING_RUN_DIR / "lens" / CONFIG_FILE).read_text())
    assert ceiling_run["config"]["train"]["encoder_rotate"] == 0
    assert ceiling_run["config"]["train"]["decoder_rotate"] == 0
    assert ConsistencyLens.from_pretrained(result.lens_dir, device="cpu").encoder.rotate == rotate


def test_train_ceiling_trains_a_fresh_e_of_the_lens_shape(dumped, tmp_path, capsys, monkeypatch):
    lens_run = tmp_path / "lens_run"
    trainer.train(load_config(None, _overrides(dumped, lens_run, "warm_start", 1)))

    def no_text(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ceiling's validation wrote D's text")

    monkeypatch.setattr(ConsistencyLens, "reconstruct", no_text)
    lens_dir = lens_run / "lens"
    before = (lens_dir / "lens.safetensors").read_bytes()
    # The user's budget (3 steps, lr) and data; the lens's E shape and T_text.
    budget = _overrides(dumped, tmp_path / "work", "plan", 3, t_text=5, **{"lora_r": 4})
    main(["train-ceiling", "--checkpoint", str(lens_dir), *budget])
    ceiling = ceiling_dir(lens_dir)
    assert capsys.readouterr().out.strip().endswith(f"context ceiling: {ceiling}")
    meta = json.loads((ceiling / CEILING_CONFIG).read_text())
    assert meta["trained"]["objective"] == "context_ceiling" and meta["trained"]["steps"] == 3
    assert meta["t_text"] == 2 and meta["lora_r"] == 8  # the lens's, not the overrides'
    run = tmp_path / "work" / trainer.CEILING_RUN_DIR
    assert _encoder_weights(run / "lens").keys() == load_file(str(ceiling / CEILING_WEIGHTS)).keys()
    assert (lens_dir / "lens.safetensors").read_bytes() == before  # the lens itself is untouched
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"mse_e", "kl_e"} <= set(next(r for r in records if r.get("kind") == "train"))
    val = [r for r in records if r.get("kind") == "val"]
    assert len(val) == 4 and all(r["val_kl"] >= 0 for r in val)  # steps 0-3, E on the context


def test_train_ceiling_refuses_bad_input_in_one_sentence(dumped, tmp_path, capsys):
    budget = _overrides(dumped, tmp_path / "work", "plan", 1)
    line = cli_error(capsys, ["train-ceiling", "--checkpoint", str(tmp_path / "none"), *budget])
    assert "No saved lens at" in line and "<run_dir>/lens" in line  # and the fix
    lens_run = tmp_path / "lens_run"
    trainer.train(load_config(None, _overrides(dumped, lens_run, "warm_start", 1)))
    other = [a for a in budget if not a.startswith("model=")] + ["model=gpt2"]
    line = cli_error(capsys, ["train-ceiling", "--checkpoint", str(lens_run / "lens"), *other])
    assert "set model=" in line


def test_a_lens_started_from_another_keeps_its_ceiling_when_it_fits(dumped, tmp_path):
    """The ceiling reads the true context, never the lens's weights: a continuation keeps it
    byte for byte; one of another T_text (E reads other inputs) gets none."""
    source = trainer.train(
        load_config(
            None, _overrides(dumped, tmp_path / "src", "grpo", 1, **{"warm_start.steps": 1})
        )
    ).lens_dir
    kept = ceiling_dir(source)
    go_on = _overrides(dumped, tmp_path / "more", "grpo", 1, init_from=source)
    lens_dir = trainer.train(load_config(None, go_on)).lens_dir
    for name in (CEILING_WEIGHTS, CEILING_CONFIG):
        assert (ceiling_dir(lens_dir) / name).read_bytes() == (kept / name).read_bytes()
    longer = _overrides(dumped, tmp_path / "t3", "grpo", 1, init_from=source, t_text=3)
    assert not ceiling_dir(trainer.train(load_config(None, longer)).lens_dir).exists()
