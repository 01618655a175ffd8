"""The eval's verdict and the model-card section it writes: which baselines the lens beats, and
whether it beats its own explanations shuffled and the constant train mean."""

from __future__ import annotations

from consistency_lens.evaluation.html import fmt
from consistency_lens.evaluation.tables import BASELINE_NAMES as BASELINE_LABELS
from consistency_lens.evaluation.tables import ci_text, markdown_tables


def _above_zero(ci: list | None) -> bool:
    return bool(ci) and ci[0] == ci[0] and ci[0] > 0


def verdict_line(results: dict) -> str:
    """One line: does the lens beat its shuffled explanations and the constant train mean?"""
    shuffled = results["baselines"].get("shuffled", {})
    if shuffled.get("kl_recovered") is None:
        shuffled_text = "unavailable (" + shuffled.get("unavailable", "not measured") + ")"
    else:
        ci = shuffled["kl_recovered_ci"]
        yes = "yes" if _above_zero(ci) else "no"
        shuffled_text = (
            f"{yes} (kl_recovered {fmt(shuffled['kl_recovered'], 3)}, 95% CI {ci_text(ci)})"
        )
    margin = results.get("margin_over_constant", {}).get("fve")
    if margin is None:
        const_text = "not measured"
    else:
        yes = "yes" if _above_zero(margin["ci"]) else "no"
        const_text = f"{yes} (FVE margin {fmt(margin['value'], 3)}, 95% CI {ci_text(margin['ci'])})"
    return (
        f"**Beats its shuffled explanations:** {shuffled_text}; **beats the constant train mean "
        f"as Â:** {const_text}."
    )


def model_card(results: dict) -> str:
    """The model-card section with the eval numbers, in Markdown."""
    beats = [
        BASELINE_LABELS.get(name, name)
        for name, base in results["baselines"].items()
        if name != "shuffled" and _above_zero(base.get("kl_recovered_ci"))
    ]
    verdict = (
        "The lens beats " + ", ".join(beats) + " (95% CI of kl_recovered above zero)."
        if beats
        else "The lens does not beat any baseline with a 95% CI above zero."
    )
    shuffled = results["baselines"].get("shuffled")
    if (
        shuffled
        and shuffled.get("kl_recovered") is not None
        and not _above_zero(shuffled["kl_recovered_ci"])
    ):
        verdict += (
            " It does not beat its own explanations shuffled across samples, so its texts are not "
            "specific to their activations (mode collapse): what it gains is a better constant."
        )
    return (
        "## Evaluation\n\n"
        f"{verdict_line(results)}\n\n"
        f"Validation split `{results['split']}`, {results['num_samples']} samples, "
        f"{results['bootstrap']} bootstrap resamples. KL is KL(M(A) ‖ M(·)) of the frozen model's "
        "next-token distribution at P when block L's output there is replaced.\n\n"
        + markdown_tables(results)
        + f"\n{verdict}\n"
    )
