"""`consistency-lens compare`: two lenses' eval results on the same samples, paired.

Two evals of 128 samples each have KL CIs about 0.3 nats wide, so two recipes a tenth of a nat
apart look alike; most of that width is which samples are hard, which both lenses share. The
differences sample by sample (B − A) have tighter CIs: the honest test of "better".
"""

from __future__ import annotations

from pathlib import Path

import torch

from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.specificity import pooled_difference, texts_named
from consistency_lens.utils.io import read_json

PER_SAMPLE_KEYS = ("index", "kl", "sq_err", "sq_dev", "nll", "words")
READER_KEYS = ("reader_kl", "reader_sq_err")
# The specificity bucket compared: M's top-5 next tokens at P (does the text name them?).
BUCKET = "top5"


def _figures(results: dict, where: str) -> dict[str, torch.Tensor]:
    """The per-sample figures of one results file, as float64 tensors (the indices as int64)."""
    rows = results.get("per_sample")
    if (
        not isinstance(rows, dict)
        or any(key not in rows for key in PER_SAMPLE_KEYS)
        or BUCKET not in rows.get("deranged", {})
    ):
        raise LensError(
            f"Results '{where}' hold no per-sample figures (eval results written before eval "
            "recorded them, or another file); pass an eval_results.json of today's "
            "`consistency-lens eval`."
        )
    out = {key: torch.tensor(rows[key], dtype=torch.float64) for key in PER_SAMPLE_KEYS}
    out["index"] = out["index"].long()
    for side in ("own", "deranged"):
        out[side] = torch.tensor(rows[side][BUCKET], dtype=torch.float64)
    # The ceiling's E reading the text: only where the lens kept a ceiling (and eval recorded it).
    for key in READER_KEYS:
        if key in rows:
            out[key] = torch.tensor(rows[key], dtype=torch.float64)
    return out


def _reader(results: dict) -> tuple | None:
    """Which reader the context ceiling was, as an eval recorded it: its weights' checksum and
    the order it read the lens's text in (None: not recorded)."""
    row = results.get("baselines", {}).get("context_ceiling", {})
    sha, rotate = row.get("weights_sha256"), row.get("reads_lens_text", {}).get("rotate")
    return None if sha is None or rotate is None else (sha, rotate)


def _fve(sq_err: torch.Tensor, sq_dev: torch.Tensor) -> float:
    """`metrics.fve` from per-sample sums; ‖A − mean(A)‖² is about the whole set's mean, so a
    resample keeps that mean where eval's own FVE CI re-estimates it (a slightly narrower CI)."""
    return float(1.0 - sq_err.sum() / sq_dev.sum().clamp(min=1e-12))


def _paired_mean(a: torch.Tensor, b: torch.Tensor, resamples: int, seed: int) -> dict:
    """Both means and the mean of B − A sample by sample, with its bootstrap CI."""
    diff = b - a
    return {
        "a": float(a.mean()),
        "b": float(b.mean()),
        "difference": float(diff.mean()),
        "ci": list(metrics.mean_ci(diff, resamples, seed)),
    }


def compare_results(
    a: dict, b: dict, resamples: int = 1000, seed: int = 0, names: tuple[str, str] = ("A", "B")
) -> dict:
    """Paired differences B − A of two eval results on the same samples, with bootstrap CIs that
    resample the samples jointly: KL at P, FVE, the top-5 bucket's own − deranged specificity
    (does the text name M's next tokens?) as a share of words and as a share of texts, the
    explanations' NLL per token under M and, where both were read by the same context ceiling,
    that ceiling's KL and FVE reading each text (`reader_kl`, `reader_fve`)."""
    pa, pb = _figures(a, names[0]), _figures(b, names[1])
    # The same split (its plan's checksum, where both record it: results written before eval
    # recorded it have none), the same sample indices in it and the same activations
    # (‖A − mean(A)‖² of every sample), whatever path it was read from.
    splits = {a.get("split_sha256"), b.get("split_sha256")} - {None}
    same = (
        len(splits) <= 1
        and torch.equal(pa["index"], pb["index"])
        and torch.allclose(pa["sq_dev"], pb["sq_dev"], rtol=1e-4, atol=1e-6)
    )
    if not same:
        raise LensError(
            f"Results '{names[0]}' and '{names[1]}' were computed on different samples; evaluate "
            "both lenses on the same val split (same corpus, seed, seq_len, p_min, val_samples "
            "and output_dir) with the same eval.num_samples."
        )
    dev = pa["sq_dev"]

    def fve_gain(err_a: torch.Tensor, err_b: torch.Tensor, dev: torch.Tensor) -> float:
        return _fve(err_b, dev) - _fve(err_a, dev)

    spec = [pa["own"], pa["deranged"], pa["words"], pb["own"], pb["deranged"], pb["words"]]
    named_a, named_b = (texts_named(p["own"], p["deranged"]) for p in (pa, pb))

    def spec_gain(*rows: torch.Tensor) -> float:
        return pooled_difference(*rows[3:]) - pooled_difference(*rows[:3])

    def fve_row(err_a: torch.Tensor, err_b: torch.Tensor) -> dict:
        return {
            "a": _fve(err_a, dev),
            "b": _fve(err_b, dev),
            "difference": fve_gain(err_a, err_b, dev),
            "ci": list(
                metrics.bootstrap_ci(fve_gain, err_a, err_b, dev, resamples=resamples, seed=seed)
            ),
        }

    # A reader that chose neither text (the context ceiling's E), where both results have the
    # same one (two lenses' own ceilings, or one read in two orders, would be two readers).
    readers = {_reader(a), _reader(b)}
    reader: dict = {}
    if all(key in p for p in (pa, pb) for key in READER_KEYS):
        if len(readers) == 1 and None not in readers:
            reader = {
                "reader_kl": _paired_mean(pa["reader_kl"], pb["reader_kl"], resamples, seed),
                "reader_fve": fve_row(pa["reader_sq_err"], pb["reader_sq_err"]),
            }
        else:
            # Said, not silently dropped: both have a ceiling's reading, of two readers.
            reader = {
                "reader_unpaired": "the two results were read by different context ceilings "
                "(or in another order, or without the ceiling's checksum), so their readings "
                "are not paired"
            }
    return {
        "names": list(names),
        "num_samples": len(dev),
        "kl": {
            **_paired_mean(pa["kl"], pb["kl"], resamples, seed),
            # How often B's reconstruction is the closer one, sample by sample.
            "b_lower": float((pb["kl"] < pa["kl"]).double().mean()),
        },
        "fve": fve_row(pa["sq_err"], pb["sq_err"]),
        "top5": {
            "a": pooled_difference(*spec[:3]),
            "b": pooled_difference(*spec[3:]),
            "difference": spec_gain(*spec),
            "ci": list(metrics.bootstrap_ci(spec_gain, *spec, resamples=resamples, seed=seed)),
        },
        "top5_texts": _paired_mean(named_a, named_b, resamples, seed),
        "nll": _paired_mean(pa["nll"], pb["nll"], resamples, seed),
        **reader,
    }


def compare_command(
    first: Path, second: Path, resamples: int | None = None, output: Path | None = None
) -> dict:
    """Compare two eval_results.json files paired, print the table, optionally write it as JSON."""
    from consistency_lens.evaluation.tables import print_paired
    from consistency_lens.utils.io import atomic_write_json

    if resamples is not None and resamples < 1:
        raise LensError(f"--bootstrap {resamples} gives no confidence interval; pass 1 or more.")
    a, b = read_json(Path(first), "Eval results"), read_json(Path(second), "Eval results")
    boot = resamples if resamples is not None else int(a.get("bootstrap", 1000))
    result = compare_results(a, b, boot, 0, (str(first), str(second)))
    print_paired(result)
    if output is not None:
        atomic_write_json(Path(output), result)
    return result
