"""eval, samples, model card and explain end to end on a tiny random Llama (untrained lens)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_dump_config

from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.evaluation.evaluate import evaluate_command
from consistency_lens.evaluation.explain import explain_command
from consistency_lens.evaluation.report import write_report
from consistency_lens.models.lens import ConsistencyLens


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, corpus_dir):
    """A dump (train + val) and a freshly built lens saved where `train` would save it."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = config_from_dict(
        tiny_dump_config(
            root,
            tiny_llama_dir,
            corpus_dir,
            seq_len=24,
            num_samples=40,
            val_samples=24,
            shard_size=4096,
            dtype="float16",  # the production storage dtype
            train={"run_dir": str(root / "run"), "t_text": 3, "prompt": "thought <embed> is"},
            eval={
                "num_samples": 20,
                "batch_size": 8,
                "bootstrap": 50,
                "qualitative": 3,
                "num_sampled": 2,
            },
        )
    )
    dump_activations(cfg)
    ConsistencyLens.build(cfg).save_pretrained(root / "run" / "lens")
    return cfg


def test_eval_writes_results_samples_and_card(run):
    results = evaluate_command(run, None)
    run_dir = run.train.run_dir
    saved = json.loads((run_dir / "eval_results.json").read_text())
    assert saved["num_samples"] == 20 and saved["t_text"] == 3 and saved["layer"] == 1
    for name in ("zero", "mean", "context_tokens", "shuffled"):
        base = saved["baselines"][name]
        assert base["kl"] >= 0
        lo, hi = base["kl_recovered_ci"]
        assert lo <= base["kl_recovered"] <= hi
    assert saved["kl"]["ci"][0] <= saved["kl"]["mean"] <= saved["kl"]["ci"][1]
    assert 0 < saved["diversity"]["fraction_unique"] <= 1
    assert saved["perplexity"] > 1
    assert -1 <= results["cosine"]["mean"] <= 1
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["sampled"]) == 2 for s in samples)
    assert "p-token" in (run_dir / "samples.html").read_text()
    card = (run_dir / "lens" / "README.md").read_text()
    assert "## Evaluation" in card and "zero ablation" in card
    # The lens directory stays loadable after the card is written, and the samples are seeded.
    again = evaluate_command(run, run_dir / "lens")
    assert again["kl"] == results["kl"]
    assert [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()] == samples
    report = write_report(run_dir).read_text()
    assert "context tokens" in report and "class='samples'" in report


def test_explain_every_position_and_html(run, tmp_path):
    page = tmp_path / "explain.html"
    text = "the nation economy congress people"
    rows = explain_command(run, None, text, page)
    lens_tok_len = len(
        ConsistencyLens.from_pretrained(run.train.run_dir / "lens")
        .loaded.tokenizer(text, add_special_tokens=False)
        .input_ids
    )
    assert [r["position"] for r in rows] == list(
        range(rows[0]["position"], rows[0]["position"] + lens_tok_len)
    )
    assert "".join(r["token"] for r in rows) == text
    assert all(r["kl"] >= 0 and -1 <= r["cosine"] <= 1 for r in rows)
    html = page.read_text()
    assert html.count("class='tok'") == len(rows) and "class='tip'" in html


def test_explain_rejects_empty_and_too_long_text(run):
    with pytest.raises(LensError, match="empty"):
        explain_command(run, None, "", None)
    with pytest.raises(LensError, match="at most 256"):
        explain_command(run, None, "the nation " * 300, None)


def test_eval_without_lens_is_a_clear_error(run, tmp_path):
    with pytest.raises(LensError, match="No saved lens"):
        evaluate_command(run, tmp_path / "nowhere")
