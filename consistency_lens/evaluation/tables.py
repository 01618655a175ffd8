"""The eval results as tables, shared by the terminal (rich), the report and the model card."""

from __future__ import annotations

from typing import Any

from consistency_lens.evaluation.html import fmt

BASELINE_NAMES = {
    "zero": "zero ablation",
    "mean": "mean ablation",
    "context_tokens": "context tokens",
    "shuffled": "lens, shuffled",
}
NOTE = (
    "KL(M(A) ‖ M(·)) of M's next-token distribution at P, in nats (lower is better). lens: "
    "Â = E(D(A)) with D's greedy text; zero: A = 0; mean: the per-feature mean of A over the "
    "train split; context tokens: E reads the true last T_text tokens of the context instead of "
    "D's text; lens, shuffled: the lens's Â of another sample (as good as the lens when every "
    "explanation is the same). kl_recovered = 1 − KL_lens / KL_baseline (above 0: the lens beats that baseline)."
)


RECON_NOTE = (
    "normalised MSE = Σ‖A−Â‖² / Σ‖A‖²; FVE = 1 − Σ‖A−Â‖² / Σ‖A−Ā‖² (fraction of variance "
    "explained); perplexity of D's greedy texts under M after a BOS token; diversity over the "
    "greedy texts (a low unique fraction means mode collapse)."
)


def _ci(pair: list[float] | None) -> str:
    if not pair:
        return ""
    return f"[{fmt(pair[0], 3)}, {fmt(pair[1], 3)}]"


NOTES = (NOTE, RECON_NOTE)


def result_tables(results: dict) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) of the KL/baseline table and the reconstruction/explanation table."""
    kl = results["kl"]
    faith = [["lens", kl["mean"], _ci(kl["ci"]), "", ""]]
    # JSON files are written with sorted keys; show baselines from weakest to strongest.
    order = [k for k in BASELINE_NAMES if k in results["baselines"]]
    order += [k for k in results["baselines"] if k not in BASELINE_NAMES]
    for key in order:
        base = results["baselines"][key]
        faith.append(
            [
                BASELINE_NAMES.get(key, key),
                base["kl"],
                _ci(base["kl_ci"]),
                base["kl_recovered"],
                _ci(base["kl_recovered_ci"]),
            ]
        )
    recon = [
        ["MSE", results["mse"], ""],
        ["normalised MSE", results["nmse"], ""],
        ["FVE", results["fve"]["mean"], _ci(results["fve"]["ci"])],
        ["cosine(A, Â)", results["cosine"]["mean"], _ci(results["cosine"]["ci"])],
        ["perplexity of explanations under M", results["perplexity"], ""],
        ["unique explanations (fraction)", results["diversity"]["fraction_unique"], ""],
        ["distinct-1", results["diversity"]["distinct_1"], ""],
        ["distinct-2", results["diversity"]["distinct_2"], ""],
    ]
    n = results["num_samples"]
    return [
        (
            f"KL at P on {n} validation samples",
            ["method", "KL", "95% CI", "kl_recovered", "95% CI"],
            faith,
        ),
        ("Reconstruction and explanations", ["metric", "value", "95% CI"], recon),
    ]


def print_rich(results: dict) -> None:
    """Print the eval tables to the terminal with `rich`."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for (title, headers, rows), note in zip(result_tables(results), NOTES, strict=True):
        table = Table(title=title, title_justify="left", caption=note, caption_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(fmt(c, 4) for c in row))
        console.print(table)


def markdown_tables(results: dict) -> str:
    """The eval tables as Markdown (for the model card and BENCHMARKS.md)."""
    out = []
    for (title, headers, rows), note in zip(result_tables(results), NOTES, strict=True):
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "---|" * len(headers))
        for row in rows:
            out.append("| " + " | ".join(fmt(c) for c in row) + " |")
        out.append(f"\n{note}\n")
    return "\n".join(out)
