"""eval, samples, model card and explain end to end on a tiny random Llama (untrained lens)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import dumped_eval_config, make_text, split_of

from consistency_lens.cli import main
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.errors import LensError
from consistency_lens.evaluation.commands import card_command, evaluate_command
from consistency_lens.evaluation.compare import compare_results
from consistency_lens.evaluation.explain import explain_command
from consistency_lens.evaluation.report import write_report
from consistency_lens.models.lens import MEAN_FILE, ConsistencyLens


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, corpus_dir):
    """A dump (train + val) and a freshly built lens saved where `train` would save it."""
    root = tmp_path_factory.mktemp("evalrun")
    cfg = dumped_eval_config(
        root,
        tiny_llama_dir,
        corpus_dir,
        num_samples=40,
        val_samples=24,
        shard_size=4096,
        dtype="float16",  # the production storage dtype
        eval={
            "num_samples": 20,
            "batch_size": 8,
            "bootstrap": 50,
            "qualitative": 3,
            "num_sampled": 2,
        },
    )
    ConsistencyLens.build(cfg).save_pretrained(root / "run" / "lens")
    return cfg


def _tree_hashes(directory) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path (the bytes, not the mtimes)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_eval_writes_results_and_samples_but_never_the_lens_dir(run):
    run_dir = run.train.run_dir
    lens_dir = run_dir / "lens"
    before = _tree_hashes(lens_dir)
    results = evaluate_command(run, None)
    assert _tree_hashes(lens_dir) == before  # eval leaves every byte of the lens directory as is
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
    assert set(saved["constant_mean"]) == {"mse", "nmse", "fve", "cosine"}
    assert set(saved["specificity"]["buckets"]) == {"context", "next_tokens", "top5", "any"}
    # The per-sample figures `compare` pairs on give back the aggregates.
    rows = saved["per_sample"]
    assert len(rows["index"]) == 20 and len(set(rows["index"])) == 20
    meta = json.loads((Path(saved["split"]) / "metadata.json").read_text())
    assert saved["split_sha256"] == meta["plan_sha256"] and len(saved["split_sha256"]) == 64
    assert np.mean(rows["kl"]) == pytest.approx(saved["kl"]["mean"], rel=1e-5)
    fve = 1 - np.sum(rows["sq_err"]) / np.sum(rows["sq_dev"])
    assert fve == pytest.approx(saved["fve"]["mean"], abs=1e-5)
    assert np.exp(np.mean(rows["nll"])) == pytest.approx(saved["perplexity"], rel=1e-5)
    # (Hits per bucket: tests/evaluation/test_faithfulness.py; this lens writes no content word.)
    spec = saved["specificity"]
    assert len(rows["words"]) == 20 and sum(rows["words"]) == spec["content_words"]
    assert set(rows["own"]) == set(rows["deranged"]) == set(spec["buckets"])
    assert "per_sample" not in spec
    itself = compare_results(saved, saved, resamples=50)
    assert itself["kl"]["difference"] == 0.0 and itself["fve"]["ci"] == [0.0, 0.0]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["sampled"]) == 2 for s in samples)
    assert "p-token" in (run_dir / "samples.html").read_text()
    assert "Specificity examples" in (run_dir / "samples.html").read_text()
    # The card is written only on request, from the results of this lens.
    card_command(lens_dir, run_dir / "eval_results.json")
    card = (lens_dir / "README.md").read_text()
    assert "## Evaluation" in card and "zero ablation" in card
    assert "Beats its shuffled explanations:** " in card and "constant train mean" in card
    assert "Reconstruction against a constant" in card and "Specificity" in card
    assert json.loads((lens_dir / "eval_results.json").read_text()) == saved
    # The lens directory stays loadable after the card is written, and the samples are seeded.
    again = evaluate_command(run, lens_dir)
    assert again["kl"] == results["kl"]
    assert [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()] == samples
    report = write_report(run_dir).read_text()
    assert "context tokens" in report and "class='samples'" in report
    assert "Specificity of explanations" in report and "Specificity examples" in report
    assert "Reconstruction against a constant" in report


def test_eval_and_explain_refuse_to_write_into_the_lens_dir(run, tmp_path):
    lens_dir = run.train.run_dir / "lens"
    before = _tree_hashes(lens_dir)
    with pytest.raises(LensError, match="inside the lens directory"):
        evaluate_command(run, lens_dir, lens_dir)
    with pytest.raises(LensError, match="inside the lens directory"):
        explain_command(run, lens_dir, "the nation", lens_dir / "explain.html")
    assert _tree_hashes(lens_dir) == before


def test_card_refuses_results_of_other_weights(run, tmp_path):
    lens_dir = run.train.run_dir / "lens"
    fake = tmp_path / "results.json"
    fake.write_text(json.dumps({"lens_weights_sha256": "0" * 64}))
    with pytest.raises(LensError, match="were not computed on the weights"):
        card_command(lens_dir, fake)
    # The same through the command line: one sentence, exit status 2.
    with pytest.raises(SystemExit) as stop:
        main(["card", str(lens_dir), "--results", str(fake)])
    assert stop.value.code == 2


def test_eval_on_another_corpus_dumps_its_val_split_and_leaves_the_lens_alone(
    run, tmp_path, tiny_llama_dir
):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(40):
        (other / f"doc{i}.txt").write_text(make_text(1000 + i, 80))
    lens_dir = run.train.run_dir / "lens"
    before = _tree_hashes(lens_dir)
    cfg = run.model_copy(update={"corpus": str(other)})
    results = evaluate_command(cfg, lens_dir)
    assert _tree_hashes(lens_dir) == before
    out = run.train.run_dir / "eval_other"
    assert json.loads((out / "eval_results.json").read_text())["kl"] == results["kl"]
    assert results["split"].endswith("other_val")
    assert results["corpus"] == str(other)  # what the card names as the evaluated dataset
    assert results["val_leak"] is None  # a corpus the lens never trained on
    # A lens without a training mean of its own: the mean of its training corpus's train split.
    assert results["mean_from"] == str(split_of(run, "train"))
    # The dump it made is the val split alone, for the lens's model and layer.
    split = results["split"]
    assert json.loads((Path(split) / "metadata.json").read_text())["count"] == run.val_samples
    assert not (Path(split).parent / "other_train").exists()


def test_eval_says_when_the_lens_may_have_trained_on_its_val_samples(run, tmp_path, capsys):
    """Its own corpus in another seeded order: the val samples read may be training samples.
    The check reads the config that dumped the split read, not the one eval was given."""
    assert evaluate_command(run, None, tmp_path / "own")["val_leak"] is None
    reseeded = run.model_copy(update={"seed": run.seed + 1})  # the lens's own val split, reused
    assert evaluate_command(reseeded, None, tmp_path / "reused")["val_leak"] is None
    capsys.readouterr()
    other_order = run.model_copy(update={"seed": run.seed + 1, "output_dir": tmp_path / "dumps"})
    results = evaluate_command(other_order, run.train.run_dir / "lens", tmp_path / "out")
    why = f"it trained on {run.corpus} with another seed"
    assert results["val_leak"] == why
    assert f"Warning: the lens may have trained on some of these val samples: {why}." in (
        capsys.readouterr().out
    )
    # A split dumped by a version with settings this one lacks (a section's key, a top-level
    # key): the check reads the settings it needs and gives the same answer.
    meta_path = Path(results["split"]) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["decode"]["added_later"] = 1
    meta["config"]["added_later"] = 1
    meta_path.write_text(json.dumps(meta))
    assert (
        evaluate_command(other_order, run.train.run_dir / "lens", tmp_path / "later")["val_leak"]
        == why
    )


def test_a_lens_carrying_its_training_mean_needs_no_training_dump(run, tmp_path):
    """Eval's mean baseline comes from the mean the lens carries: the same row, to the bit, as
    from the train split, in a dump directory that holds only the val split."""
    lens = ConsistencyLens.from_pretrained(run.train.run_dir / "lens", device="cpu")
    lens.train_mean = ActivationDataset(split_of(run, "train")).mean_activation()
    carried = tmp_path / "lens"
    lens.save_pretrained(carried)
    bare = run.model_copy(update={"output_dir": tmp_path / "dumps"})
    shutil.copytree(split_of(run, "val"), split_of(bare, "val"))
    results = evaluate_command(bare, carried, tmp_path / "out")
    assert not split_of(bare, "train").exists()
    assert results["mean_from"] == str(carried / MEAN_FILE)
    reference = evaluate_command(run, None, tmp_path / "reference")
    assert reference["mean_from"] == str(split_of(run, "train"))
    assert results["baselines"]["mean"] == reference["baselines"]["mean"]
    assert results["kl"] == reference["kl"]
    # Another mean is really used: the row moves with it.
    lens.train_mean = lens.train_mean + 1.0
    lens.save_pretrained(carried)
    moved = evaluate_command(bare, carried, tmp_path / "out")
    assert moved["baselines"]["mean"]["kl"] != reference["baselines"]["mean"]["kl"]


def test_explain_every_position_and_html(run, tmp_path, capsys):
    page = tmp_path / "explain.html"
    text = "the nation economy congress people"
    rows = explain_command(run, None, text, page)
    table = capsys.readouterr().out
    assert "M next" in table and "with Â" in table
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
    # M's top-3 next tokens beside the reconstruction's, in the rows, the table and the page.
    assert all(len(r["top_model"]) == len(r["top_lens"]) == 3 for r in rows)
    assert all(1 >= r["top_model"][0][1] >= r["top_model"][2][1] > 0 for r in rows)
    assert "M&#x27;s top-3 next" in html and "top-3 with Â patched in" in html
    assert "M next: " in html and "Â next: " in html


def test_explain_rejects_empty_and_too_long_text(run):
    with pytest.raises(LensError, match="empty"):
        explain_command(run, None, "", None)
    with pytest.raises(LensError, match="at most 256"):
        explain_command(run, None, "the nation " * 300, None)


def test_eval_without_lens_is_a_clear_error(run, tmp_path):
    with pytest.raises(LensError, match="No saved lens"):
        evaluate_command(run, tmp_path / "nowhere")


def test_explain_without_a_trained_lens_uses_the_one_shipped_for_the_model(
    run, tmp_path, monkeypatch, capsys
):
    """No --checkpoint and nothing at `<run_dir>/lens`: the package's lens for the model is used,
    and named; a model with no shipped lens still gets the clear error."""
    import consistency_lens.shipped as shipped_mod

    shipped = tmp_path / "package" / "tiny-lens"
    shutil.copytree(run.train.run_dir / "lens", shipped)
    monkeypatch.setattr(shipped_mod, "_HERE", shipped.parent)
    monkeypatch.setattr(shipped_mod, "SHIPPED", {run.model: "tiny-lens"})
    empty = run.model_copy(update={"train": run.train.model_copy(update={"run_dir": tmp_path})})
    before = _tree_hashes(shipped)
    rows = explain_command(empty, None, "the nation", None)
    assert f"using the lens shipped for {run.model}: '{shipped}'" in capsys.readouterr().out
    assert rows == explain_command(run, None, "the nation", None)
    assert _tree_hashes(shipped) == before
    with pytest.raises(LensError, match="No saved lens"):  # eval's results are the run's own
        evaluate_command(empty, None)
    (tmp_path / "checkpoints").mkdir()  # an interrupted run is resumed, not replaced
    with pytest.raises(LensError, match="No saved lens"):
        explain_command(empty, None, "the nation", None)
    (tmp_path / "checkpoints").rmdir()
    monkeypatch.setattr(shipped_mod, "SHIPPED", {})
    with pytest.raises(LensError, match="No saved lens"):
        explain_command(empty, None, "the nation", None)


def test_the_shipped_lens_is_in_the_package_for_the_embedded_model():
    """The lens `explain` falls back to is a complete lens directory for the embedded default."""
    from safetensors import safe_open

    from consistency_lens.models.embedded import ALIAS
    from consistency_lens.shipped import shipped_lens

    path = shipped_lens(ALIAS)
    assert path is not None
    meta = json.loads((path / "lens_config.json").read_text())
    assert meta["base_model"] == ALIAS and meta["config"]["train"]["mode"] == "lora"
    with safe_open(path / "lens.safetensors", "pt") as f:
        assert any(k.startswith("decoder.") for k in f.keys())
        assert any(k.startswith("encoder.") for k in f.keys())
    assert "FVE" in (path / "README.md").read_text()
    # Shipped in bf16 (its card's figures were recomputed so), the context ceiling too.
    for weights in (path / "lens.safetensors", path / "context_ceiling" / "encoder.safetensors"):
        with safe_open(weights, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, weights


def test_eval_reports_the_perplexity_of_the_true_context_against_a_hand_computation(run):
    """`perplexity_context` is exp of the mean, over samples, of M's mean NLL of each sample's true
    last T_text context tokens read after BOS, as the explanations' perplexity is read."""
    import math

    import torch

    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.evaluation.samples import sample_indices

    results = evaluate_command(run, None)
    lens = ConsistencyLens.build(run)
    t_text = run.train.t_text
    dataset = ActivationDataset(Path(results["split"]), seed=run.seed)
    nlls = []
    for i in sample_indices(len(dataset), run.eval.num_samples, run.seed):
        context = torch.as_tensor(dataset[i]["input_ids_A"]).long()
        assert len(context) >= t_text  # p_min >= T_text here: every sample counts
        ids = torch.cat([torch.tensor([lens.orig.bos_id]), context[-t_text:]]).unsqueeze(0)
        with torch.no_grad():
            logits = lens.orig.model(input_ids=ids).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1)
        nlls.append(-float(logp.gather(-1, ids[0, 1:, None]).mean()))
    expected = math.exp(sum(nlls) / len(nlls))
    assert results["perplexity_context"]["samples"] == run.eval.num_samples
    assert results["perplexity_context"]["value"] == pytest.approx(expected, rel=1e-3)
    report = write_report(run.train.run_dir).read_text()
    row = f"perplexity of the true last {t_text} context tokens under M ({run.eval.num_samples} samples)"
    assert row in report and f"{results['perplexity_context']['value']:.1f}" in report


def test_the_context_perplexity_leaves_out_rows_shorter_than_t_text():
    """A row counts only with t_text real context tokens, also where `last_context` clipped the
    batch to fewer columns (every row short); the perplexity is exp of the kept rows' mean NLL."""
    import math

    import torch

    from consistency_lens.evaluation.faithfulness import _context_perplexity, context_text_nll

    class Orig:  # a stand-in M: each row's "mean NLL" is its first token id
        def text_nll(self, ids: torch.Tensor) -> torch.Tensor:
            return ids[:, 0].float()

    ids = torch.tensor([[0, 5, 6], [1, 7, 8], [2, 9, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    nll = context_text_nll(Orig(), ids, mask, t_text=3)
    assert nll[0].isnan() and nll[1:].tolist() == [1.0, 2.0]
    # Clipped to 3 columns for t_text 4: every row is short, none counts.
    assert context_text_nll(Orig(), ids, torch.ones_like(mask), t_text=4).isnan().all()
    assert _context_perplexity(nll) == {"value": pytest.approx(math.exp(1.5)), "samples": 2}
    assert _context_perplexity(torch.full((2,), float("nan"))) == {"value": None, "samples": 0}
