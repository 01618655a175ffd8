"""`encoder_refit`: E alone re-fitted to the explanations the lens shows (best of N under
`decode`), D frozen, the texts unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_e_alone_learns, objective_batch, tiny_dump_config
from pydantic import ValidationError

from consistency_lens.config import LensConfig, config_from_dict, load_config
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.training import trainer
from consistency_lens.training.objectives import build_objective, normalised_mse, step_info


def _lens(model_dir, decode: dict, **train) -> ConsistencyLens:
    cfg = LensConfig(
        model=str(model_dir),
        device="cpu",
        model_dtype="float32",
        layer=1,
        seed=0,
        decode=decode,
        train={
            "t_text": 3,
            "mode": "lora",
            "mse_weight": 2.0,
            "objective": "encoder_refit",
            "decoder_rotate": 1,
            "encoder_rotate": 1,
            # Only checked to be set here: these tests build the objective, not a run.
            "init_from": "lens",
        }
        | train,
    )
    torch.manual_seed(0)
    return ConsistencyLens.build(cfg)


def test_refit_reads_the_shown_text_and_trains_e_only(tiny_llama_dir):
    """The loss is E's error on the text `reconstruct` shows (best of 4 here, not D's greedy
    text), and only E gets gradients."""
    lens = _lens(
        tiny_llama_dir,
        {"samples": 4, "prediction": 1.0},
        alpha={"kind": "constant", "start": 0.0},
    )
    batch = objective_batch(lens)
    objective = build_objective(lens, lens.cfg)
    shown, shown_hat = lens.reconstruct(batch.A)
    greedy = lens.decoder.generate(batch.A, 3, greedy=True)
    assert not torch.equal(shown, greedy)  # the choice matters, so the test can tell them apart
    out = objective(lens, batch, step_info(type(objective), lens.cfg, 0))
    mse = normalised_mse(shown_hat, batch.A.float())
    assert float(out.terms["mse_e"].detach()) == pytest.approx(float(mse), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(2.0 * float(mse), rel=1e-5)
    assert float(out.terms["kl_e"].detach()) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(objective.reconstruct(lens, batch), shown_hat)
    assert_e_alone_learns(lens, objective, batch, out, mse_weight=2.0)


def test_a_training_step_leaves_the_explanations_as_they_were(tiny_llama_dir):
    """One optimiser step moves E and not one shown token."""
    lens = _lens(tiny_llama_dir, {"samples": 4})
    batch = objective_batch(lens)
    objective = build_objective(lens, lens.cfg)
    shown, before = lens.reconstruct(batch.A)
    decoder = {n: p.detach().clone() for n, p in lens.decoder.named_parameters()}
    opt = torch.optim.AdamW(lens.param_groups(), lr=1e-2)
    objective(lens, batch, step_info(type(objective), lens.cfg, 0)).loss.backward()
    opt.step()
    after_ids, after = lens.reconstruct(batch.A)
    assert torch.equal(after_ids, shown)
    assert all(torch.equal(p, decoder[n]) for n, p in lens.decoder.named_parameters())
    assert not torch.equal(after, before)


def test_refit_refuses_a_text_chosen_by_e_no_lens_or_a_strategy(tiny_llama_dir):
    lens = _lens(tiny_llama_dir, {"samples": 2})
    cfg = lens.cfg
    for change, fix in (
        ({"decode": cfg.decode.model_copy(update={"reconstruction": 1.0})}, "reconstruction=0"),
        ({"train": cfg.train.model_copy(update={"init_from": None})}, "init_from=LENS_DIR"),
        ({"distributed": cfg.distributed.model_copy(update={"strategy": "ddp"})}, "=none"),
    ):
        with pytest.raises(LensError, match=fix):
            build_objective(lens, cfg.model_copy(update=change))


def test_decoder_rotate_is_allowed_with_refit_only_among_e_objectives(tiny_llama_dir):
    _lens(tiny_llama_dir, {}, decoder_rotate=2)  # builds
    with pytest.raises(ValidationError, match="decoder_rotate"):
        LensConfig(
            model=str(tiny_llama_dir),
            train={"t_text": 3, "decoder_rotate": 1, "objective": "context_ceiling"},
        )


def test_a_refit_run_writes_as_the_lens_it_starts_from(
    tiny_llama_dir, corpus_dir, tmp_path, monkeypatch
):
    """Through `train`: the decode settings left unset come from the starting lens, so E is fitted
    to its shown texts and the saved lens (and its EMA copy) shows them word for word, with D's
    weights untouched even under weight decay. Validation chooses each text once (it scores the
    Â the loss was built on, not a second choice)."""
    base = tiny_dump_config(tmp_path / "dump", tiny_llama_dir, corpus_dir)
    base["train"] = {"t_text": 2}
    dump_activations(config_from_dict(base))
    top = [f"{k}={v}" for k, v in base.items() if k != "train"]
    common = [
        "train.mode=lora",
        "train.inject_layer=0",
        "train.t_text=2",
        "train.batch_size=4",
        "train.val_every=1",
        "train.val_batches=1",
        "train.log_every=1",
        "train.ckpt_every=1",
        "train.rl.samples=2",
        'train.prompt="A <embed> is"',
    ]
    source = trainer.train(
        load_config(
            None,
            top
            + common
            + [f"train.run_dir={tmp_path / 'src'}", "train.objective=grpo", "train.steps=1"]
            + ["decode.samples=4", "decode.prediction=1"],
        )
    ).lens_dir
    in_val, chosen = [], []
    val_pass, explanation = trainer._val_pass, ConsistencyLens.explanation

    def counted_val_pass(run):
        in_val.append(True)
        try:
            return val_pass(run)
        finally:
            in_val.pop()

    def counted_explanation(self, acts, *args, **kwargs):
        if in_val:
            chosen.append(len(acts))
        return explanation(self, acts, *args, **kwargs)

    monkeypatch.setattr(trainer, "_val_pass", counted_val_pass)
    monkeypatch.setattr(ConsistencyLens, "explanation", counted_explanation)
    refit = trainer.train(
        load_config(
            None,
            top
            + common
            + [f"train.run_dir={tmp_path / 'refit'}", "train.objective=encoder_refit"]
            + ["train.steps=2", f"train.init_from={source}", "train.weight_decay=0.1"]
            + ["train.ema_decay=0.5", "train.lr=0.05", "train.lr_blocks=0.05"],
        )
    ).lens_dir
    monkeypatch.undo()
    # Validation at steps 0, 1 and 2, one batch each: one choice per batch.
    assert len(chosen) == 3, chosen
    before = ConsistencyLens.from_pretrained(source, device="cpu")
    acts = torch.randn(6, before.d_model, generator=torch.Generator().manual_seed(1)) * 3
    ids, a_hat = before.reconstruct(acts)
    for lens_dir in (refit, refit.parent / "lens_ema"):
        after = ConsistencyLens.from_pretrained(lens_dir, device="cpu")
        assert after.cfg.decode == before.cfg.decode  # samples 4, prediction 1: not the defaults
        assert after.cfg.decode.samples == 4
        for (name, p), q in zip(
            after.decoder.named_parameters(), before.decoder.parameters(), strict=True
        ):
            assert torch.equal(p, q), name
        after_ids, after_hat = after.reconstruct(acts)
        assert torch.equal(after_ids, ids)
        assert not torch.equal(after_hat, a_hat)
