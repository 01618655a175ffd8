"""`run_demo` end to end on a tiny Llama: dump, a 2-step train, eval, explain, report; then reuse."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_dump_config

import consistency_lens.training.trainer as trainer
from consistency_lens.config import config_from_dict
from consistency_lens.demo import run_demo
from consistency_lens.models.ceiling import CEILING_CONFIG, ceiling_dir


def _demo_config(tmp_path, model_dir, corpus_dir, train: dict, eval: dict, **over):
    """A tiny demo: block 2 of the tiny Llama, 32 + 16 samples of 24 tokens, run in tmp/run."""
    return config_from_dict(
        tiny_dump_config(
            tmp_path,
            model_dir,
            corpus_dir,
            layer=2,
            seq_len=24,
            num_samples=32,
            val_samples=16,
            train={"run_dir": str(tmp_path / "run"), "t_text": 2, **train},
            eval=eval,
            **over,
        )
    )


def test_demo_pipeline_then_reuse(tmp_path, tiny_llama_dir, corpus_dir, monkeypatch):
    cfg = _demo_config(
        tmp_path,
        tiny_llama_dir,
        corpus_dir,
        batch_size=16,
        shard_size=4096,
        dtype="float16",  # the demo's storage dtype
        train={
            "steps": 2,
            "batch_size": 4,
            "val_every": 1,
            "val_batches": 1,
            "log_every": 1,
            "prompt": "thought <embed> is",
        },
        eval={
            "num_samples": 8,
            "batch_size": 8,
            "bootstrap": 20,
            "qualitative": 2,
            "num_sampled": 1,
            "explain_text": "the nation economy",
        },
    )
    out = run_demo(cfg)
    run_dir = tmp_path / "run"
    assert out["report"] == run_dir / "report.html" and out["report"].is_file()
    assert "plotly-graph-div" in out["report"].read_text()
    assert (run_dir / "explain.html").is_file() and (run_dir / "samples.html").is_file()
    assert "## Evaluation" in (run_dir / "lens" / "README.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("the second demo run must reuse the trained lens")

    monkeypatch.setattr(trainer, "train", no_training)
    again = run_demo(cfg)
    assert again["results"]["kl"]["mean"] == pytest.approx(out["results"]["kl"]["mean"])


def test_demo_compares_its_lens_with_the_shipped_one(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    """With a lens shipped for the model, the demo evaluates it on the same samples and prints
    the targets side by side; a shipped copy of the demo's own lens scores exactly the same."""
    import consistency_lens.shipped as shipped_mod
    from consistency_lens.evaluation.tables import TARGETS, comparison_rows

    cfg = _demo_config(
        tmp_path,
        tiny_llama_dir,
        corpus_dir,
        train={"steps": 1, "batch_size": 4},
        eval={"num_samples": 8, "batch_size": 8, "bootstrap": 20, "qualitative": 2},
        decode={"samples": 1},
    )
    assert run_demo(cfg)["shipped_results"] is None
    shutil.copytree(tmp_path / "run" / "lens", tmp_path / "package" / "copy")
    monkeypatch.setattr(shipped_mod, "_HERE", tmp_path / "package")
    monkeypatch.setattr(shipped_mod, "SHIPPED", {cfg.model: "copy"})
    out = run_demo(cfg)
    assert (tmp_path / "run" / "shipped_lens" / "eval_results.json").is_file()
    headers, rows = comparison_rows({"own": out["results"], "shipped": out["shipped_results"]})
    assert headers == ["measure", "own", "shipped", "target"] and len(rows) == len(TARGETS)
    # nan (no content words in a tiny random lens's texts) is the same result on both sides.
    assert all(row[1] == row[2] or (row[1] != row[1] and row[2] != row[2]) for row in rows)
    assert rows[1][1] == out["results"]["fve"]["mean"]
    meta_path = tmp_path / "package" / "copy" / "lens_config.json"
    original = json.loads(meta_path.read_text())

    def shipped_with(top: dict | None = None, drop: str = "", **change) -> dict | None:
        meta = {k: v for k, v in original.items() if k != drop} | (top or {})
        meta["config"] = original["config"] | change
        meta_path.write_text(json.dumps(meta))
        return run_demo(cfg)["shipped_results"]

    # Trained on a mixture holding the demo's corpus, carrying its training mean: compared on the
    # demo's own samples, with the same numbers (the same weights and mean).
    mixed = shipped_with(corpus=f"{cfg.corpus}+other")
    assert mixed is not None and mixed["kl"] == out["results"]["kl"]
    assert mixed["mean_from"].endswith("train_mean.safetensors")
    # Not compared: another layer (other dumps), a corpus without the demo's, a mixture whose mean
    # baseline needs its own dump, or a training split that may hold the demo's val samples.
    assert shipped_with(top={"layer": 1}) is None
    assert shipped_with(corpus="other") is None
    assert shipped_with(corpus=f"{cfg.corpus}+other", drop="train_mean_sha256") is None
    assert shipped_with(val_samples=cfg.val_samples - 1) is None
    assert shipped_with(seq_len=cfg.seq_len + 1) is None
    # Scored with its own decode settings, not the demo config's (the demo lens's recipe).
    own = original["config"]["decode"] | {"samples": cfg.decode.samples + 3}
    assert shipped_with(decode=own)["decode"] == own


def test_specificity_ratio_without_own_hits_is_no_ratio():
    """A lens whose texts never meet their own context has no ratio to show, not an infinite one."""
    from consistency_lens.evaluation.tables import comparison_rows

    def results(own: float, deranged: float) -> dict:
        return {
            "baselines": {"shuffled": {"kl_recovered": 0.5}},
            "fve": {"mean": 0.3},
            "diversity": {"fraction_unique": 0.7},
            "perplexity": 80.0,
            "specificity": {"buckets": {"any": {"own": own, "deranged": deranged}}},
        }

    _, rows = comparison_rows(
        {"a": results(0.0, 0.0), "b": results(0.4, 0.0), "c": results(0.4, 0.1)}
    )
    assert rows[-1][1:4] == ["n/a", float("inf"), 4.0]


def test_demo_stopped_before_its_ceiling_gets_it_without_training_the_lens_again(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    """A demo whose lens was saved but whose context ceiling was not (a run stopped between the
    two) trains only the ceiling on the next run, and its eval then reports the ceiling row."""
    cfg = _demo_config(
        tmp_path,
        tiny_llama_dir,
        corpus_dir,
        batch_size=16,
        shard_size=4096,
        train={
            "objective": "grpo",
            "steps": 1,
            "batch_size": 4,
            "val_every": 1,
            "val_batches": 1,
            "prompt": "thought <embed> is",
            "warm_start": {"steps": 1, "objective": "warm_start_predict"},
            "predict": {"tokens": 1},
        },
        eval={"num_samples": 8, "batch_size": 8, "bootstrap": 20, "qualitative": 0},
    )
    first = run_demo(cfg)
    lens_dir = tmp_path / "run" / "lens"
    assert "context_ceiling" in first["results"]["baselines"]
    weights = (lens_dir / "lens.safetensors").read_bytes()
    shutil.rmtree(ceiling_dir(lens_dir))  # as if stopped after the lens, before its ceiling

    def no_training(*args, **kwargs):
        raise AssertionError("the lens is trained already: only its ceiling may be")

    monkeypatch.setattr(trainer, "train", no_training)
    again = run_demo(cfg)
    assert (ceiling_dir(lens_dir) / CEILING_CONFIG).is_file()
    assert (lens_dir / "lens.safetensors").read_bytes() == weights
    assert "context_ceiling" in again["results"]["baselines"]
