"""`compare`: paired differences of two lenses' eval results, against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consistency_lens.cli import main
from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.compare import compare_results


def _results(kl, sq_err, sq_dev, nll, words, own, deranged) -> dict:
    n = len(kl)
    return {
        "bootstrap": 200,
        "per_sample": {
            "index": list(range(n)),
            "kl": list(map(float, kl)),
            "sq_err": list(map(float, sq_err)),
            "sq_dev": list(map(float, sq_dev)),
            "nll": list(map(float, nll)),
            "words": list(map(int, words)),
            "own": {"top5": list(map(int, own)), "context": [0] * n},
            "deranged": {"top5": list(map(int, deranged)), "context": [0] * n},
        },
    }


def _pair(n: int = 64):
    """Lens B a little better than A on every sample, on samples of very unequal difficulty."""
    rng = np.random.default_rng(0)
    hard = rng.gamma(1.0, 2.0, n)  # what both lenses share: which samples are hard
    dev = rng.uniform(5.0, 9.0, n)
    words_a, words_b = rng.integers(0, 4, n), rng.integers(1, 4, n)
    a = _results(
        hard + 0.05, 0.5 * dev, dev, rng.uniform(3, 5, n), words_a, words_a // 2, words_a // 3
    )
    b = _results(
        hard - 0.05 + rng.normal(0, 0.02, n),
        0.4 * dev,
        dev,
        rng.uniform(3, 5, n),
        words_b,
        words_b // 2 + 1,
        np.zeros(n),
    )
    return a, b


def test_differences_are_the_hand_computed_paired_ones():
    a, b = _pair()
    out = compare_results(a, b, resamples=500)
    pa, pb = a["per_sample"], b["per_sample"]
    kl = np.array(pb["kl"]) - np.array(pa["kl"])
    assert out["num_samples"] == 64
    assert out["kl"]["difference"] == pytest.approx(kl.mean(), abs=1e-12)
    assert out["kl"]["b_lower"] == pytest.approx((kl < 0).mean(), abs=1e-12)
    # FVE = 1 - sum ||A - Â||² / sum ||A - mean||²: 0.5 and 0.6 by construction.
    assert out["fve"]["a"] == pytest.approx(0.5, abs=1e-12)
    assert out["fve"]["b"] == pytest.approx(0.6, abs=1e-12)
    assert out["fve"]["difference"] == pytest.approx(0.1, abs=1e-12)
    nll = np.array(pb["nll"]) - np.array(pa["nll"])
    assert out["nll"]["difference"] == pytest.approx(nll.mean(), abs=1e-12)

    # The top-5 bucket as eval pools it: (sum own hits - sum deranged hits) / sum words.
    def pooled(p: dict) -> float:
        own, der = np.sum(p["own"]["top5"]), np.sum(p["deranged"]["top5"])
        return (own - der) / np.sum(p["words"])

    assert out["top5"]["a"] == pytest.approx(pooled(pa), abs=1e-12)
    assert out["top5"]["b"] == pytest.approx(pooled(pb), abs=1e-12)
    assert out["top5"]["difference"] == pytest.approx(pooled(pb) - pooled(pa), abs=1e-12)

    # Per text: does it name its own top-5 (a hit) minus does it name the deranged one's.
    def texts(p: dict) -> np.ndarray:
        return (np.array(p["own"]["top5"]) > 0) * 1.0 - (np.array(p["deranged"]["top5"]) > 0)

    assert out["top5_texts"]["a"] == pytest.approx(texts(pa).mean(), abs=1e-12)
    assert out["top5_texts"]["b"] == pytest.approx(texts(pb).mean(), abs=1e-12)
    assert out["top5_texts"]["difference"] == pytest.approx(
        (texts(pb) - texts(pa)).mean(), abs=1e-12
    )
    # B names its own top-5 in every text (words_b // 2 + 1 >= 1) and never the deranged one's.
    assert out["top5_texts"]["b"] == 1.0
    for key in ("kl", "fve", "top5", "top5_texts", "nll"):
        lo, hi = out[key]["ci"]
        assert lo <= out[key]["difference"] <= hi
    # The FVE gain is the same ratio on every resample here (errors proportional to dev).
    assert out["fve"]["ci"] == pytest.approx([0.1, 0.1], abs=1e-9)


def test_pairing_sees_a_difference_the_separate_cis_cannot():
    """Each lens's own KL CI overlaps the other's (samples differ a lot in difficulty), but the
    sample-by-sample differences put B's advantage clearly above 0."""
    import torch

    a, b = _pair()
    out = compare_results(a, b, resamples=500)
    ci_a = metrics.mean_ci(torch.tensor(a["per_sample"]["kl"]), 500, 0)
    ci_b = metrics.mean_ci(torch.tensor(b["per_sample"]["kl"]), 500, 0)
    assert ci_b[1] > ci_a[0]  # separate CIs overlap
    assert out["kl"]["ci"][1] < 0  # paired: B lower, CI below 0
    assert out["kl"]["ci"][1] - out["kl"]["ci"][0] < 0.1 * (ci_a[1] - ci_a[0])


def test_a_lens_against_itself_differs_by_nothing():
    a, _ = _pair()
    out = compare_results(a, a, resamples=100)
    for key in ("kl", "fve", "top5", "top5_texts", "nll"):
        assert out[key]["difference"] == 0.0 and out[key]["ci"] == [0.0, 0.0]
    assert out["kl"]["b_lower"] == 0.0


def test_results_of_other_samples_or_without_figures_are_refused(tmp_path, capsys):
    a, b = _pair()
    shifted = json.loads(json.dumps(b))
    shifted["per_sample"]["index"] = [i + 1 for i in shifted["per_sample"]["index"]]
    with pytest.raises(LensError, match="were computed on different samples"):
        compare_results(a, shifted)
    other = json.loads(json.dumps(b))
    other["per_sample"]["sq_dev"][3] *= 1.5  # another activation at the same index
    with pytest.raises(LensError, match="were computed on different samples"):
        compare_results(a, other)
    resplit = json.loads(json.dumps(b)) | {"split_sha256": "1" * 64}  # another split's plan
    with pytest.raises(LensError, match="were computed on different samples"):
        compare_results(a | {"split_sha256": "0" * 64}, resplit)
    # Results written before eval recorded the checksum are checked on the samples alone.
    assert compare_results(a, resplit)["num_samples"] == len(a["per_sample"]["index"])
    with pytest.raises(LensError, match="hold no per-sample figures"):
        compare_results({"kl": {"mean": 1.0}}, b)
    # Through the command line: one sentence, exit status 2, nothing written.
    paths = []
    for name, results in (("a", a), ("b", shifted)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(results))
    with pytest.raises(SystemExit) as stop:
        main(["compare", *map(str, paths), "--output", str(tmp_path / "out.json")])
    assert stop.value.code == 2
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(SystemExit) as stop:
        main(["compare", *map(str, paths), "--bootstrap", "0"])
    assert stop.value.code == 2
    (tmp_path / "b.json").write_text(json.dumps(b))
    main(["compare", *map(str, paths), "--output", str(tmp_path / "out.json")])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["kl"]["difference"] == compare_results(a, b, resamples=200)["kl"]["difference"]
    assert "Paired on the same 64 samples" in capsys.readouterr().out


def test_the_fve_gain_is_resampled_jointly_across_both_lenses():
    """B's squared error is A's minus a tenth of ‖A − mean‖² on every sample, A's own errors
    scattered: resampled jointly the gain is 0.1 on every draw; resampling each lens apart
    would scatter it."""
    a, b = _pair()
    rng = np.random.default_rng(1)
    dev = np.array(a["per_sample"]["sq_dev"])
    err_a = dev * rng.uniform(0.2, 0.9, len(dev))
    a["per_sample"]["sq_err"] = err_a.tolist()
    b["per_sample"]["sq_err"] = (err_a - 0.1 * dev).tolist()
    out = compare_results(a, b, resamples=300)
    assert out["fve"]["difference"] == pytest.approx(0.1, abs=1e-12)
    assert out["fve"]["ci"] == pytest.approx([0.1, 0.1], abs=1e-9)
    assert out["fve"]["a"] == pytest.approx(1 - err_a.sum() / dev.sum(), abs=1e-12)


def test_the_ceilings_reading_is_paired_only_for_the_same_ceiling(capsys):
    """Two decodes of one lens, read by the E of its context ceiling (which chose neither text):
    paired by hand; two different ceilings are two readers, so no reader rows."""
    from consistency_lens.evaluation.tables import paired_rows, print_paired

    a, b = _pair()
    dev = np.array(a["per_sample"]["sq_dev"])
    rng = np.random.default_rng(2)
    for results, kl, frac in ((a, rng.uniform(1, 3, 64), 0.7), (b, rng.uniform(1, 3, 64), 0.55)):
        results["per_sample"]["reader_kl"] = kl.tolist()
        results["per_sample"]["reader_sq_err"] = (frac * dev).tolist()
        results["baselines"] = {
            "context_ceiling": {"weights_sha256": "c" * 64, "reads_lens_text": {"rotate": 2}}
        }
    out = compare_results(a, b, resamples=200)
    assert "reader_unpaired" not in out
    kl = np.array(b["per_sample"]["reader_kl"]) - np.array(a["per_sample"]["reader_kl"])
    assert out["reader_kl"]["difference"] == pytest.approx(kl.mean(), abs=1e-12)
    lo, hi = out["reader_kl"]["ci"]
    assert lo <= kl.mean() <= hi
    assert out["reader_fve"]["a"] == pytest.approx(0.3, abs=1e-12)
    assert out["reader_fve"]["difference"] == pytest.approx(0.15, abs=1e-12)
    labels = [row[0] for row in paired_rows(out)[1]]
    assert "KL at P, the context ceiling's E reading the text" in labels
    # Another ceiling, the same ceiling reading in another order, or none recorded: other readers.
    row = b["baselines"]["context_ceiling"]
    for key, value in (("weights_sha256", "d" * 64), ("weights_sha256", None)):
        other = compare_results(a, b | {"baselines": {"context_ceiling": row | {key: value}}})
        assert "reader_kl" not in other and "reader_fve" not in other
        assert "different context ceilings" in other["reader_unpaired"]
        assert len(paired_rows(other)[1]) == len(labels) - 2
    print_paired(other)
    assert "not paired" in " ".join(capsys.readouterr().out.split())
    turned = row | {"reads_lens_text": {"rotate": 0}}
    assert "reader_kl" not in compare_results(a, b | {"baselines": {"context_ceiling": turned}})
    # Only the reader rows may be missing from a comparison's table.
    del out["nll"]
    with pytest.raises(KeyError):
        paired_rows(out)
