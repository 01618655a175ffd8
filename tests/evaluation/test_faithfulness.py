"""Honest faithfulness metrics: derangement, the constant reference, specificity (docs/design.md section 5)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import WordTokenizer, dumped_eval_config, split_of

from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.evaluation.faithfulness import derangement, evaluate
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.specificity import specificity
from consistency_lens.evaluation.tables import markdown_tables
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.utils.words import content_words


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_derangement_has_no_fixed_point_for_every_size(seed):
    assert derangement(0, seed) is None and derangement(1, seed) is None
    for n in range(2, 80):
        perm = derangement(n, seed)
        assert sorted(perm) == list(range(n))  # a permutation
        assert all(perm[i] != i for i in range(n))  # that pairs no sample with itself
        assert derangement(n, seed) == perm  # seeded
    # Not always the same shift: a uniform derangement, not a roll.
    assert len({tuple(derangement(6, s)) for s in range(20)}) > 3


VOCAB = WordTokenizer(
    [
        "the",
        "of",
        ",",
        ".",
        "----",
        "Taxes",
        "war",
        "peace",
        "trade",
        "union",
        "law",
        "navy",
        "farm",
        "gold",
        "bank",
        "road",
        "school",
        "a",
        "s",
        "2024",
        "<|im_end|>",
    ]
)


def test_content_words_drop_stop_words_punctuation_and_case():
    assert (
        content_words(VOCAB, [0, 1, 2, 3, 4, 17, 18]) == set()
    )  # stop-words, punctuation, letters
    assert content_words(VOCAB, [5, 6, 5, 19]) == {"taxes", "war", "2024"}
    # A special token is no word (normalised, `<|im_end|>` would read as "imend").
    assert content_words(VOCAB, [20, 6]) == {"war"}


def test_specificity_copying_explanations_beat_their_derangement():
    contexts = [[5 + i, 0, 1] for i in range(10)]  # each sample has its own content word
    explanations = [content_words(VOCAB, [5 + i, 3]) for i in range(10)]  # copies it
    buckets = {
        "context": [content_words(VOCAB, c) for c in contexts],
        "next_tokens": [set() for _ in range(10)],
        "top5": [set() for _ in range(10)],
    }
    perm = derangement(10, 0)
    out = specificity(explanations, buckets, perm, resamples=200, seed=0)
    ctx, anyb = out["buckets"]["context"], out["buckets"]["any"]
    assert (ctx["own"], ctx["deranged"], ctx["difference"]) == (1.0, 0.0, 1.0)
    assert ctx["difference_ci"] == [1.0, 1.0] and anyb["own"] == 1.0
    assert out["buckets"]["next_tokens"]["own"] == 0.0 and out["content_words"] == 10
    # Each sample's counts, which `compare` pairs on: every copy hits its own context, and
    # under the derangement no other's.
    rows = out["per_sample"]
    assert rows["words"] == [1] * 10
    assert rows["own"]["context"] == [1] * 10 and rows["deranged"]["context"] == [0] * 10
    assert rows["own"]["top5"] == [0] * 10 and rows["own"]["any"] == [1] * 10
    # Every text names its own context and none another's: the per-text rate agrees exactly.
    assert (ctx["texts_own"], ctx["texts_deranged"], ctx["texts_difference"]) == (1.0, 0.0, 1.0)
    assert ctx["texts_difference_ci"] == [1.0, 1.0]


def test_specificity_per_text_rate_does_not_fall_with_longer_texts():
    # Two lenses name each sample's own top-5 word exactly once. The long lens adds two words
    # from no bucket, so its pooled word rate is a third of the short lens's; its text rate is
    # the same. Sample 3's text has no content word at all and counts as a text without a hit.
    top5 = [{f"w{i}"} for i in range(6)]
    buckets = {"context": [set()] * 6, "next_tokens": [set()] * 6, "top5": top5}
    short = [{f"w{i}"} for i in range(6)]
    long = [{f"w{i}", f"pad{i}", f"fill{i}"} for i in range(6)]
    short[3], long[3] = set(), set()
    perm = derangement(6, 0)
    a = specificity(short, buckets, perm, resamples=200, seed=0)["buckets"]["top5"]
    b = specificity(long, buckets, perm, resamples=200, seed=0)["buckets"]["top5"]
    assert (a["own"], a["deranged"]) == (1.0, 0.0)  # 5 hits / 5 words
    assert b["own"] == 5 / 15 and b["deranged"] == 0.0
    for row in (a, b):
        assert row["texts_own"] == 5 / 6 and row["texts_deranged"] == 0.0
        assert row["texts_difference"] == 5 / 6
        lo, hi = row["texts_difference_ci"]
        assert 0 < lo <= 5 / 6 <= hi == 1.0


def test_specificity_of_a_collapsed_lens_is_exactly_zero():
    # Every explanation is the same word; half the contexts happen to contain it.
    contexts = [[5 if i % 2 else 6, 7 + i] for i in range(12)]
    explanations = [content_words(VOCAB, [5, 3]) for _ in range(12)]
    buckets = {
        "context": [content_words(VOCAB, c) for c in contexts],
        "next_tokens": [set() for _ in range(12)],
        "top5": [set() for _ in range(12)],
    }
    out = specificity(explanations, buckets, derangement(12, 3), resamples=200, seed=0)
    ctx = out["buckets"]["context"]
    assert ctx["own"] == 0.5 and ctx["deranged"] == 0.5 and ctx["difference"] == 0.0
    assert ctx["texts_own"] == 0.5 and ctx["texts_deranged"] == 0.5
    assert ctx["texts_difference"] == 0.0
    own, der = out["per_sample"]["own"]["context"], out["per_sample"]["deranged"]["context"]
    assert own == [i % 2 for i in range(12)] and sum(der) == 6
    lo, hi = ctx["difference_ci"]
    assert lo < 0 < hi  # resampled pairs scatter around the exact zero, so the CI spans it
    # '----' for every sample: no content word at all, so the rates are reported unavailable.
    dashes = specificity([set()] * 12, buckets, derangement(12, 3))
    assert "no explanation has a content word" in dashes["unavailable"]
    assert dashes["content_free_fraction"] == 1.0
    # A content-free text names nothing: its text shares are 0, not unknown.
    for row in dashes["buckets"].values():
        assert (row["texts_own"], row["texts_deranged"], row["texts_difference"]) == (0, 0, 0)
        assert row["texts_difference_ci"] == [0.0, 0.0]
    # Without a derangement the own shares are still measured; only the comparison is missing.
    alone = specificity(explanations, buckets, None)["buckets"]["context"]
    assert (alone["own"], alone["texts_own"]) == (0.5, 0.5)
    assert alone["texts_deranged"] != alone["texts_deranged"] and alone["texts_difference_ci"] == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, corpus_dir):
    root = tmp_path_factory.mktemp("faith")
    cfg = dumped_eval_config(
        root,
        tiny_llama_dir,
        corpus_dir,
        num_samples=30,
        val_samples=12,
        eval={"num_samples": 9, "batch_size": 4, "bootstrap": 30, "qualitative": 0},
    )
    lens = ConsistencyLens.build(cfg)
    return cfg, lens, ActivationDataset(split_of(cfg, "val"))


def _with_eval(cfg, **update):
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update=update)})


def test_constant_mean_row_equals_a_hand_computation(setup):
    cfg, lens, val = setup
    results = evaluate(lens, val, cfg)
    train = ActivationDataset(split_of(cfg, "train"))
    mean = torch.stack([train.sample(i)[1] for i in range(len(train))]).double().mean(0).float()
    torch.testing.assert_close(train.mean_activation(), mean)
    A = torch.stack([val.sample(i)[1] for i in sample_indices(len(val), 9, cfg.seed)])
    C = mean.expand_as(A)
    err = ((A - C) ** 2).sum()
    hand = {
        "mse": float(((A - C) ** 2).mean()),
        "nmse": float(err / (A**2).sum()),
        "fve": float(1 - err / ((A - A.mean(0)) ** 2).sum()),
        "cosine": float(torch.nn.functional.cosine_similarity(A, C, dim=-1).mean()),
    }
    for key, value in hand.items():
        assert results["constant_mean"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    margin = results["margin_over_constant"]
    assert margin["fve"]["value"] == pytest.approx(results["fve"]["mean"] - hand["fve"], abs=1e-6)
    assert margin["mse"]["value"] == pytest.approx(hand["mse"] - results["mse"], rel=1e-5)
    lo, hi = margin["fve"]["ci"]
    assert lo <= margin["fve"]["value"] <= hi
    table = markdown_tables(results)
    assert "constant Â = train mean" in table and "Specificity of explanations" in table
    assert "texts own" in table
    # Results written before the per-text share existed render it n/a, not a crash.
    old = copy.deepcopy(results)
    for row in old["specificity"]["buckets"].values():
        for key in ("texts_own", "texts_deranged", "texts_difference", "texts_difference_ci"):
            del row[key]
    line = next(x for x in markdown_tables(old).splitlines() if "context window ending at P" in x)
    assert line.replace(" ", "").endswith("|n/a|n/a|n/a||")


def test_shuffled_is_a_derangement_of_the_whole_set_whatever_the_batch_size(setup):
    cfg, lens, val = setup
    by_one = evaluate(lens, val, _with_eval(cfg, batch_size=1))
    by_four = evaluate(lens, val, cfg)  # 9 samples: the last batch holds one sample
    shuffled = by_one["baselines"]["shuffled"]
    # Rolling inside a batch of one would compare each sample with itself (KL equal to the lens's).
    assert shuffled["kl"] != pytest.approx(by_one["kl"]["mean"], rel=1e-3)
    assert shuffled["kl"] == pytest.approx(by_four["baselines"]["shuffled"]["kl"], rel=1e-4)
    for key in ("content_words", "content_free_fraction"):
        assert by_one["specificity"][key] == by_four["specificity"][key]


def test_one_sample_reports_shuffled_as_unavailable(setup):
    cfg, lens, val = setup
    results = evaluate(lens, val, _with_eval(cfg, num_samples=1))
    shuffled = results["baselines"]["shuffled"]
    assert shuffled["kl"] is None and "at least 2" in shuffled["unavailable"]
    assert "at least 2" in results["specificity"].get("unavailable", "") or (
        "content word" in results["specificity"].get("unavailable", "")
    )
    table = markdown_tables(results)
    assert "| lens, shuffled | unavailable |" in table


def test_sparse_content_words_still_get_a_finite_interval():
    # 1 of 40 explanations has a content word: most resamples draw none and are dropped.
    explanations = [set() for _ in range(40)]
    explanations[0] = {"taxes"}
    buckets = {
        "context": [{"taxes"} if i in (0, 5) else set() for i in range(40)],
        "next_tokens": [set() for _ in range(40)],
        "top5": [set() for _ in range(40)],
    }
    out = specificity(explanations, buckets, derangement(40, 0), resamples=300, seed=0)
    lo, hi = out["buckets"]["context"]["difference_ci"]
    assert lo == lo and hi == hi and lo <= out["buckets"]["context"]["difference"] <= hi
