"""Eval's context ceiling row and M's top-1 in the explanation, against direct computations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WordTokenizer, dumped_eval_config, split_of

from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.card import model_card
from consistency_lens.evaluation.commands import evaluate_command
from consistency_lens.evaluation.faithfulness import derangement, evaluate
from consistency_lens.evaluation.report import eval_section
from consistency_lens.evaluation.samples import (
    qualitative_samples,
    sample_indices,
    samples_fragment,
    top1_hit,
)
from consistency_lens.evaluation.specificity import top1_in_explanation
from consistency_lens.evaluation.tables import markdown_tables
from consistency_lens.models.ceiling import ceiling_from_lens, load_ceiling
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.patching import patched_kl

VOCAB = WordTokenizer(["the", "War", "peace", ",", "\n", "trade", "gold", "bank", "<|im_end|>"])


def test_top1_in_explanation_on_a_hand_made_case():
    explanations = [
        [1, 2],
        [0, 5],
        [6, 3],
        [7, 7],
    ]  # "War peace", "the trade", "gold ,", "bank bank"
    top1 = [1, 0, 3, 4]  # "War" (hit), "the" (hit, a stop-word), "," and "\n" (not words)
    out = top1_in_explanation(VOCAB, explanations, top1, perm=[1, 0, 3, 2], resamples=50)
    assert (out["counted"], out["not_a_word"]) == (2, 2)
    assert out["own"] == 1.0  # case is ignored: "War" matches "war"
    # Sample 0 gets "the" (not in "War peace"), sample 1 gets "War" (not in "the trade").
    assert out["deranged"] == 0.0 and out["difference"] == 1.0
    assert [r["in_explanation"] for r in out["per_sample"]] == [True, True, None, None]
    assert [r["top1"] for r in out["per_sample"]] == [" War", " the", " ,", " \n"]
    # A derangement that hands sample 0 its own-word top-1 through another sample counts it.
    same = top1_in_explanation(VOCAB, [[1], [1], [2]], [1, 1, 2], perm=[1, 2, 0], resamples=50)
    assert (same["own"], same["deranged"]) == (1.0, 1 / 3)
    alone = top1_in_explanation(VOCAB, [[1]], [1], perm=None)
    assert alone["own"] == 1.0 and "at least 2" in alone["unavailable"]


def test_top1_in_explanation_apart_for_content_words():
    """The content-word row leaves out samples whose top-1 is a stop-word: 'the' in 'the trade'
    is a hit of the whole row but not of this one."""
    explanations = [
        [1, 2],
        [0, 5],
        [6, 6],
        [7, 5],
    ]  # "War peace", "the trade", "gold gold", "bank trade"
    top1 = [1, 0, 5, 7]  # "War" (hit), "the" (hit, a stop-word), "trade" (miss), "bank" (hit)
    out = top1_in_explanation(VOCAB, explanations, top1, perm=[1, 2, 3, 0], resamples=50)
    assert (out["counted"], out["own"]) == (4, 3 / 4)
    content = out["content_top1"]
    assert content["counted"] == 3 and content["own"] == 2 / 3
    # Deranged: sample 0 gets "the" (a stop-word: not counted here), 1 gets "trade" (in "the
    # trade": a hit), 2 gets "bank" (miss), 3 gets "War" (miss).
    assert out["deranged"] == 1 / 4 and content["deranged"] == 1 / 3
    assert content["difference"] == 2 / 3 - 1 / 3 and len(content["difference_ci"]) == 2
    # A special-token top-1 is no word: counted apart, as punctuation is, never a content word.
    special = top1_in_explanation(VOCAB, [[8, 1], [1]], [8, 1], perm=[1, 0], resamples=50)
    assert (special["counted"], special["not_a_word"]) == (1, 1)
    assert special["content_top1"]["counted"] == 1
    none = top1_in_explanation(VOCAB, [[0]], [0], perm=None)["content_top1"]
    assert none["counted"] == 0 and none["difference_ci"] == []


def test_each_qualitative_sample_says_whether_its_top1_is_in_the_explanation():
    assert top1_hit(VOCAB, [1, 2], 1) is True
    assert top1_hit(VOCAB, [0, 5], 6) is False
    assert top1_hit(VOCAB, [0, 5], 3) is None  # ',' is no word
    assert top1_hit(VOCAB, [8, 5], 8) is None  # nor a special token ("imend" once it was)
    rec = {"index": 0, "position": 1, "context_elided": 0, "context_tokens": [" the", " War"]}
    rec.update(greedy=" War", kl=0.1, cosine=0.5, sampled=[], sampled_kl=[])
    assert (
        "<td>&#x27; War&#x27; <span class='muted small'>in the text</span></td>"
        in samples_fragment([{**rec, "top1": " War", "top1_in_explanation": True}])
    )
    assert "<td></td>" in samples_fragment([rec])  # a page from before the column


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, corpus_dir):
    root = tmp_path_factory.mktemp("ceiling")
    cfg = dumped_eval_config(
        root,
        tiny_llama_dir,
        corpus_dir,
        num_samples=30,
        val_samples=12,
        eval={"num_samples": 9, "batch_size": 4, "bootstrap": 30, "qualitative": 0},
    )
    lens = ConsistencyLens.build(cfg)
    lens_dir = root / "lens"
    lens.save_pretrained(lens_dir)
    # The ceiling's E: the same shape, other weights (as a warm start's E would have).
    other = ConsistencyLens.build(cfg, loaded=lens.loaded)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in other.trainable_parameters().items():
            if name.startswith("encoder."):
                param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=gen))
    source = root / "warm"
    other.save_pretrained(source)
    ceiling_from_lens(source, lens_dir)
    val = ActivationDataset(split_of(cfg, "val"))
    mean = ActivationDataset(split_of(cfg, "train")).mean_activation()
    return cfg, lens, lens_dir, other, val, mean


def test_ceiling_row_equals_a_direct_computation(setup):
    cfg, lens, lens_dir, _, val, mean = setup
    twin, _ = load_ceiling(lens, lens_dir)
    results = evaluate(lens, val, cfg, mean, twin)
    row = results["baselines"]["context_ceiling"]
    kls, hats, As, text_kls, text_hats = [], [], [], [], []
    for i in sample_indices(len(val), 9, cfg.seed):
        ids, A = val.sample(i)
        ids, A = ids[None].long(), A[None]
        with torch.no_grad():
            # One sample, no padding: the true last T_text tokens ending at P.
            a_hat = twin.encode_ids(ids[:, -3:])
            # The same E reading the lens's own explanation of A, as the lens's E reads it.
            a_text = twin.encode_ids(lens.explanation(A))
            kl, text_kl = patched_kl(lens.orig, ids, torch.ones_like(ids), A, [a_hat, a_text])
        kls.append(kl)
        hats.append(a_hat)
        As.append(A)
        text_kls.append(text_kl)
        text_hats.append(a_text)
    kl, A_hat, A = torch.cat(kls), torch.cat(hats), torch.cat(As)
    text_kl, A_text = torch.cat(text_kls), torch.cat(text_hats)
    reader = row["reads_lens_text"]
    assert reader["kl"] == pytest.approx(float(text_kl.mean()), rel=1e-4)
    assert reader["fve"] == pytest.approx(metrics.fve(A, A_text), rel=1e-4, abs=1e-6)
    assert reader["kl_recovered"] == pytest.approx(1 - reader["kl"] / row["kl"], rel=1e-4)
    per = results["per_sample"]
    assert per["reader_kl"] == pytest.approx(text_kl.tolist(), rel=1e-4, abs=1e-7)
    err = ((A - A_text) ** 2).sum(-1)
    assert per["reader_sq_err"] == pytest.approx(err.tolist(), rel=1e-4, abs=1e-6)
    # Not the lens's own reading of its text: another E reads it.
    with torch.no_grad():
        own = torch.cat([lens.encode_ids(lens.explanation(a[None])) for a in A])
    assert not torch.allclose(own, A_text, rtol=1e-3, atol=1e-5)
    assert row["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert row["fve"] == pytest.approx(metrics.fve(A, A_hat), rel=1e-4, abs=1e-6)
    assert row["kl_gap"] == pytest.approx(results["kl"]["mean"] - row["kl"], rel=1e-4)
    assert row["kl_recovered"] == pytest.approx(1 - results["kl"]["mean"] / row["kl"], rel=1e-4)
    assert row["fve_gap"] == pytest.approx(results["fve"]["mean"] - row["fve"], abs=1e-5)
    for key in ("kl", "kl_recovered", "fve", "kl_gap", "fve_gap"):
        lo, hi = row[f"{key}_ci"]
        assert lo <= hi, key  # a percentile CI of a ratio need not hold the point on 9 samples
    lo, hi = row["kl_ci"]
    assert lo <= row["kl"] <= hi
    # Another E than the lens's own: not the context_tokens row under a new name.
    assert row["kl"] != pytest.approx(results["baselines"]["context_tokens"]["kl"], rel=1e-3)
    table = markdown_tables(results)
    assert "| context ceiling |" in table and "**Context ceiling**" in table
    assert "the ceiling's E reading the lens's text" in table
    # Results written before the ceiling read the lens's text still render, without those rows.
    del row["reads_lens_text"]
    older = markdown_tables(results)
    assert "**Context ceiling**" in older and "reading the lens's text" not in older


def test_context_rows_read_the_true_context_in_order_under_a_rotated_e(setup):
    """With `train.encoder_rotate`, E reads D's text rotated, but the `context_tokens` and
    `context_ceiling` rows read the true context in order, ending on the token at P."""
    cfg, lens, lens_dir, _, val, mean = setup
    twin, _ = load_ceiling(lens, lens_dir)
    plain = evaluate(lens, val, cfg, mean, twin)
    # Only the lens's E is set to rotate: the ceiling reads true tokens in order whatever its
    # own setting, and the lens's text as the lens's E does.
    lens.encoder.rotate = 2
    try:
        rotated = evaluate(lens, val, cfg, mean, twin)
    finally:
        lens.encoder.rotate = 0
    for row in ("context_tokens", "context_ceiling"):
        assert rotated["baselines"][row]["kl"] == plain["baselines"][row]["kl"], row
    assert rotated["kl"]["mean"] != pytest.approx(plain["kl"]["mean"], rel=1e-4)  # D's text
    # The ceiling reads the lens's text as the lens's E does: rotated too, and says so.
    readers = [r["baselines"]["context_ceiling"]["reads_lens_text"] for r in (plain, rotated)]
    assert readers[0]["kl"] != pytest.approx(readers[1]["kl"], rel=1e-4)
    assert (readers[0]["rotate"], readers[1]["rotate"]) == (0, 2)
    ids, A = val.sample(sample_indices(len(val), 9, cfg.seed)[0])
    with torch.no_grad():
        a_text = twin.encode_ids(lens.explanation(A[None]), rotate=2)
        (kl,) = patched_kl(
            lens.orig, ids[None].long(), torch.ones_like(ids[None]), A[None], [a_text]
        )
    assert rotated["per_sample"]["reader_kl"][0] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)


def test_a_lens_without_a_ceiling_evaluates_as_before(setup, padded_passes):
    # Padded: one more vector set widens a packed pass's masked keys, which moves other rows'
    # KL in the last float digits; the padded pass keeps every row's arithmetic as it was.
    cfg, lens, _, _, val, mean = setup
    twin, _ = load_ceiling(lens, setup[2])
    without = evaluate(lens, val, cfg, mean)
    with_ceiling = evaluate(lens, val, cfg, mean, twin)
    assert "context_ceiling" not in without["baselines"]
    assert set(with_ceiling["baselines"]) - set(without["baselines"]) == {"context_ceiling"}
    # The ceiling's reading of the lens's text is kept per sample too; nothing else differs.
    reader = {key: with_ceiling["per_sample"].pop(key) for key in ("reader_kl", "reader_sq_err")}
    assert len(reader["reader_kl"]) == len(reader["reader_sq_err"]) == 9
    # Compared as JSON: an untrained lens's specificity rates are NaN, which is never == itself.
    same = {k: v for k, v in with_ceiling.items() if k != "baselines"}
    assert json.dumps(same, sort_keys=True) == json.dumps(
        {k: v for k, v in without.items() if k != "baselines"}, sort_keys=True
    )
    for name, row in without["baselines"].items():
        assert json.dumps(with_ceiling["baselines"][name]) == json.dumps(row), name
    assert "Context ceiling" not in markdown_tables(without)
    # The top-1 rows are per evaluated sample, in order.
    top1 = without["top1_in_explanation"]
    indices = sample_indices(len(val), 9, cfg.seed)
    assert [r["index"] for r in top1["per_sample"]] == [int(i) for i in indices]
    assert top1["counted"] + top1["not_a_word"] == 9
    assert derangement(9, cfg.seed) is not None and top1["difference_ci"]


def test_eval_command_reports_the_ceiling_kept_beside_the_lens(setup, tmp_path):
    cfg, lens, lens_dir, _, _, _ = setup
    results = evaluate_command(cfg, lens_dir, tmp_path)
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    row = saved["baselines"]["context_ceiling"]
    assert row["kl"] == results["baselines"]["context_ceiling"]["kl"] and row["kl"] > 0
    assert row["trained"]["corpus"] == str(cfg.corpus)
    assert "context_tokens" in saved["baselines"]  # the old row stays
    assert "**Context ceiling**" in model_card(saved)
    assert "M's top-1 prediction in the explanation" in model_card(saved)
    page = eval_section(saved)  # the run's report.html shows the same tables
    assert "<h3>Context ceiling</h3>" in page and "top-1 prediction in the explanation" in page


def test_qualitative_records_carry_m_top1_at_p(setup):
    cfg, lens, _, _, val, _ = setup
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"qualitative": 2})})
    records = qualitative_samples(lens, val, cfg)
    for rec in records:
        ids, A = val.sample(rec["index"])
        with torch.no_grad():
            top1 = int(lens.orig.model(ids[None].long()).logits[0, -1].argmax())
        assert rec["top1"] == lens.loaded.tokenizer.decode([top1])
        greedy, _ = lens.reconstruct(A[None])  # greedy decoding is deterministic
        want = top1_hit(lens.loaded.tokenizer, greedy[0].tolist(), top1)
        assert rec["top1_in_explanation"] is want
