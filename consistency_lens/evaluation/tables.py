"""The eval results as tables, shared by the terminal (rich), the report and the model card."""

from __future__ import annotations

from typing import Any

from consistency_lens.evaluation.html import fmt

BASELINE_NAMES = {
    "zero": "zero ablation",
    "mean": "mean ablation",
    "context_tokens": "context tokens",
    "context_ceiling": "context ceiling",
    "shuffled": "lens, shuffled",
}
NOTE = (
    "KL(M(A) ‖ M(·)) of M's next-token distribution at P, in nats (lower is better). lens: "
    "Â = E(D(A)) with the lens's explanation (D's greedy text, or the best of its samples as "
    "`decode` says); zero: A = 0; mean: the per-feature mean of A over the "
    "train split; context tokens: E reads the true last T_text tokens of the context instead of "
    "D's text (E was trained on D's texts only, so this is not an ideal decoder); context ceiling "
    "(when the lens keeps one): the same true tokens read by an E trained on them alone (below 0: "
    "the lens's text carries less than its input's last T_text tokens); lens, shuffled: "
    "each sample gets another sample's Â under a seeded derangement of the whole evaluated set "
    "(as good as the lens when every explanation is the same). kl_recovered = 1 − KL_lens / "
    "KL_baseline (above 0: the lens beats that baseline)."
)
RECON_NOTE = (
    "normalised MSE = Σ‖A−Â‖² / Σ‖A‖²; FVE = 1 − Σ‖A−Â‖² / Σ‖A−Ā‖² (fraction of variance "
    "explained). constant: the same figure for Â = the train-split mean of A for every sample; "
    "margin: how much better the lens is than that constant (positive: better; for MSE the "
    "constant's minus the lens's), with a paired bootstrap CI. A lens with a margin below zero "
    "reconstructs less than a constant."
)
TEXT_NOTE = (
    "Perplexity of the explanations (written as the first row says) under M after a BOS token, "
    "beside that of each sample's true last T_text context tokens read the same way (what a lens "
    "copying the context would score; samples with a shorter context left out); diversity over "
    "the explanations (a low unique fraction means mode collapse)."
)
SPEC_NOTE = (
    "Specificity: the share of an explanation's content words (each token lower-cased, letters "
    "and digits only, stop-words dropped) found in its own sample's context window ending at P, "
    "its next corpus tokens after P, or M's top-5 predictions at P (own), against the same share "
    "in another sample's under the derangement (deranged). A positive difference with a CI above "
    "zero means the texts are about their own sample; a collapsed lens scores exactly 0. The "
    "texts columns count explanations with at least one word in the bucket, a rate that does not "
    "fall as texts grow longer (compare lenses of two text lengths on it)."
)


CEILING_NOTE = (
    "The context ceiling is an encoder trained on the true last T_text context tokens ending at P "
    "only (the warm start's E, or `consistency-lens train-ceiling`), reading those tokens. gap: "
    "the lens's figure minus the ceiling's, with a paired bootstrap CI (KL above 0 or FVE below 0: "
    "the lens's text carries less of A than the tokens it echoes). The last rows give the "
    "ceiling's E reading the lens's own text instead (as the lens's E reads it): a reader that "
    "never saw D's texts and took no part in choosing them (`decode.reconstruction` chooses "
    "with the lens's own E), so no choice favoured it."
)
TOP1_NOTE = (
    "Whether M's top-1 next token at P (decoded alone, lower-cased, letters and digits only) is "
    "one of the explanation's words (each token decoded alone and each whitespace-separated word, "
    "normalised alike; stop-words count), over the samples whose top-1 is a word; deranged: "
    "another sample's top-1 under the derangement."
)


def ci_text(pair: list[float] | None) -> str:
    """`[lo, hi]` of a confidence interval, or '' when there is none."""
    if not pair:
        return ""
    return f"[{fmt(pair[0], 3)}, {fmt(pair[1], 3)}]"


def _kl_table(results: dict) -> tuple[str, list[str], list[list[Any]], str]:
    kl = results["kl"]
    rows = [["lens", kl["mean"], ci_text(kl["ci"]), "", ""]]
    # JSON files are written with sorted keys; show baselines from weakest to strongest.
    order = [k for k in BASELINE_NAMES if k in results["baselines"]]
    order += [k for k in results["baselines"] if k not in BASELINE_NAMES]
    note = NOTE
    for key in order:
        base = results["baselines"][key]
        label = BASELINE_NAMES.get(key, key)
        if base.get("kl") is None:
            rows.append([label, "unavailable", "", "", ""])
            note += f" {label}: unavailable, {base.get('unavailable', 'not measured')}."
            continue
        rows.append(
            [
                label,
                base["kl"],
                ci_text(base["kl_ci"]),
                base["kl_recovered"],
                ci_text(base["kl_recovered_ci"]),
            ]
        )
    n = results["num_samples"]
    headers = ["method", "KL", "95% CI", "kl_recovered", "95% CI"]
    return (f"KL at P on {n} validation samples", headers, rows, note)


def _recon_table(results: dict) -> tuple[str, list[str], list[list[Any]], str]:
    const = results.get("constant_mean", {})
    margin = results.get("margin_over_constant", {})
    lens = {
        "mse": (results["mse"], None),
        "nmse": (results["nmse"], None),
        "fve": (results["fve"]["mean"], results["fve"]["ci"]),
        "cosine": (results["cosine"]["mean"], results["cosine"]["ci"]),
    }
    labels = {"mse": "MSE", "nmse": "normalised MSE", "fve": "FVE", "cosine": "cosine(A, Â)"}
    rows = []
    for key, label in labels.items():
        value, ci = lens[key]
        m = margin.get(key, {})
        rows.append(
            [
                label,
                value,
                ci_text(ci),
                const.get(key, ""),
                m.get("value", ""),
                ci_text(m.get("ci")),
            ]
        )
    headers = ["metric", "lens", "95% CI", "constant Â = train mean", "lens margin", "95% CI"]
    return ("Reconstruction against a constant", headers, rows, RECON_NOTE)


def decode_text(decode: dict | None) -> str:
    """How the explanations were written (`decode` of an eval's results), in words."""
    prediction = (decode or {}).get("prediction") or 0
    if not decode or not (decode.get("samples") or prediction):
        return "D's greedy text"
    text = (
        f"best of D's greedy text and {decode['samples']} samples (T {decode['temperature']:g}) "
        f"by log p_D - {decode['fluency']:g} x NLL_M above {decode['fluency_margin']:g} "
        f"+ {decode['content']:g} x content word"
    )
    if prediction:
        # Results written before `decode.prediction` existed have no such key.
        text = text.replace(
            "best of D's greedy text and",
            "best of D's greedy text, its text written from M's prediction from A and",
        )
        text += f" + {prediction:g} x names M's top-{decode['prediction_top']} from A"
    # Results written before `decode.reconstruction` existed have no such key.
    if decode.get("reconstruction"):
        text += f" - {decode['reconstruction']:g} x E's error |E(text) - A|^2 / |A|^2"
    return text


def _text_table(results: dict) -> tuple[str, list[str], list[list[Any]], str]:
    # Results written before the context's perplexity was measured have none.
    context = results.get("perplexity_context") or {}
    value = context.get("value")
    rows = [
        ["explanations written as", decode_text(results.get("decode"))],
        ["perplexity of explanations under M", results["perplexity"]],
        [
            f"perplexity of the true last {results.get('t_text', 'T_text')} context tokens under M "
            f"({context.get('samples', 0)} samples)",
            # Plain digits: fmt writes values of 1000 and more in e-notation.
            "n/a" if value is None else f"{value:.1f}",
        ],
        ["unique explanations (fraction)", results["diversity"]["fraction_unique"]],
        ["distinct-1", results["diversity"]["distinct_1"]],
        ["distinct-2", results["diversity"]["distinct_2"]],
    ]
    return ("Explanations", ["metric", "value"], rows, TEXT_NOTE)


def _spec_table(spec: dict) -> tuple[str, list[str], list[list[Any]], str]:
    from consistency_lens.evaluation.specificity import BUCKET_NAMES, BUCKETS

    rows = []
    # JSON files are written with sorted keys; show the buckets in their defined order.
    for key in [b for b in BUCKETS if b in spec["buckets"]]:
        row = spec["buckets"][key]
        rows.append(
            [
                BUCKET_NAMES.get(key, key),
                row["own"],
                row["deranged"],
                row["difference"],
                ci_text(row["difference_ci"]),
                # Results written before the per-text rate existed lack it: n/a.
                row.get("texts_own", float("nan")),
                row.get("texts_deranged", float("nan")),
                row.get("texts_difference", float("nan")),
                ci_text(row.get("texts_difference_ci", [])),
            ]
        )
    note = (
        f"{SPEC_NOTE} Context window: {spec.get('context_window')} tokens; "
        f"{spec['content_words']} content words; explanations without any: "
        f"{fmt(spec['content_free_fraction'], 3)}."
    )
    if spec.get("unavailable"):
        note += f" Unavailable: {spec['unavailable']}."
    headers = [
        "bucket",
        "words own",
        "words deranged",
        "difference",
        "95% CI",
        "texts own",
        "texts deranged",
        "texts difference",
        "texts 95% CI",
    ]
    return ("Specificity of explanations", headers, rows, note)


def _ceiling_table(results: dict) -> tuple[str, list[str], list[list[Any]], str]:
    row = results["baselines"]["context_ceiling"]
    rows = [
        ["KL at P", results["kl"]["mean"], row["kl"], ci_text(row["kl_ci"])],
        ["KL gap (lens − ceiling)", "", row["kl_gap"], ci_text(row["kl_gap_ci"])],
        [
            "kl_recovered of the lens over it",
            "",
            row["kl_recovered"],
            ci_text(row["kl_recovered_ci"]),
        ],
        ["FVE", results["fve"]["mean"], row["fve"], ci_text(row["fve_ci"])],
        ["FVE gap (lens − ceiling)", "", row["fve_gap"], ci_text(row["fve_gap_ci"])],
    ]
    # Results written before the ceiling read the lens's text lack it.
    reader = row.get("reads_lens_text")
    if reader is not None:
        rows += [
            [
                "KL at P, the ceiling's E reading the lens's text",
                "",
                reader["kl"],
                ci_text(reader["kl_ci"]),
            ],
            [
                "kl_recovered of the lens's text over the true tokens, both read by it",
                "",
                reader["kl_recovered"],
                ci_text(reader["kl_recovered_ci"]),
            ],
            [
                "FVE, the ceiling's E reading the lens's text",
                "",
                reader["fve"],
                ci_text(reader["fve_ci"]),
            ],
        ]
    headers = ["measure", "lens", "ceiling / gap", "95% CI"]
    return ("Context ceiling", headers, rows, CEILING_NOTE)


def _top1_table(top1: dict) -> tuple[str, list[str], list[list[Any]], str]:
    rows = [
        [
            "M's top-1 token at P in the explanation",
            top1["own"],
            top1["deranged"],
            top1["difference"],
            ci_text(top1["difference_ci"]),
        ]
    ]
    if "content_top1" in top1:
        # Older results lack it; M's top-1 is most often a stop-word, which this row leaves out.
        content = top1["content_top1"]
        rows.append(
            [
                f"the same, top-1 a content word ({content['counted']} samples)",
                content["own"],
                content["deranged"],
                content["difference"],
                ci_text(content["difference_ci"]),
            ]
        )
    note = (
        f"{TOP1_NOTE} Counted: {top1['counted']} samples; top-1 not a word (punctuation or "
        f"spaces, left out): {top1['not_a_word']}."
    )
    if top1.get("unavailable"):
        note += f" Unavailable: {top1['unavailable']}."
    headers = ["measure", "own", "deranged", "difference", "95% CI"]
    return ("M's top-1 prediction in the explanation", headers, rows, note)


def result_tables(results: dict) -> list[tuple[str, list[str], list[list[Any]], str]]:
    """(title, headers, rows, note) of each eval table: KL, the context ceiling (when measured),
    reconstruction, texts, specificity and M's top-1 in the explanation."""
    tables = [_kl_table(results)]
    if "context_ceiling" in results["baselines"]:
        tables.append(_ceiling_table(results))
    tables += [_recon_table(results), _text_table(results)]
    if "specificity" in results:
        tables.append(_spec_table(results["specificity"]))
    if "top1_in_explanation" in results:
        tables.append(_top1_table(results["top1_in_explanation"]))
    return tables


def _rich_table(
    title: str, headers: list[str], rows: list[list[Any]], digits: int, caption: str | None = None
) -> Any:
    """A `rich` table: the first column left-aligned, the others right, numbers to `digits`."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(c, digits) for c in row))
    return table


def print_rich(results: dict) -> None:
    """Print the eval tables to the terminal with `rich`."""
    from rich.console import Console

    console = Console()
    for title, headers, rows, note in result_tables(results):
        console.print(_rich_table(title, headers, rows, 4, note))


def markdown_tables(results: dict) -> str:
    """The eval tables as Markdown (for the model card and BENCHMARKS.md)."""
    out = []
    for title, headers, rows, note in result_tables(results):
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "---|" * len(headers))
        for row in rows:
            out.append("| " + " | ".join(fmt(c) for c in row) + " |")
        out.append(f"\n{note}\n")
    return "\n".join(out)


# The readable-lens targets (BENCHMARKS.md, "Readable lens"), each as (label, how to read it from results, target).
TARGETS = (
    (
        "kl_recovered over its shuffled explanations",
        lambda r: r["baselines"]["shuffled"].get("kl_recovered"),
        ">= 0.25",
    ),
    ("FVE (a constant mean scores ~0)", lambda r: r["fve"]["mean"], ">= 0.2"),
    ("unique explanations", lambda r: r["diversity"]["fraction_unique"], ">= 0.6"),
    ("perplexity of the explanations under M", lambda r: r["perplexity"], "<= 150"),
    (
        "specificity own / deranged (any bucket)",
        lambda r: _ratio(r.get("specificity", {}).get("buckets", {}).get("any")),
        ">= 2",
    ),
)


def _ratio(bucket: dict | None) -> float | None:
    # No own hits (a collapsed or empty lens) is no ratio, never an infinite one.
    if not bucket or not bucket["own"] > 0:
        return None
    return bucket["own"] / bucket["deranged"] if bucket["deranged"] else float("inf")


def comparison_rows(named: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows comparing several lenses' eval results on the readable-lens targets."""
    headers = ["measure", *named, "target"]
    rows = [
        [label, *("n/a" if (v := read(r)) is None else v for r in named.values()), target]
        for label, read, target in TARGETS
    ]
    return headers, rows


def print_comparison(named: dict[str, dict]) -> None:
    """Print the readable-lens targets side by side for several lenses evaluated on one set."""
    from rich.console import Console

    headers, rows = comparison_rows(named)
    title = "Lenses compared on the same validation samples"
    Console().print(_rich_table(title, headers, rows, 3))


# The paired measures of `evaluation.compare`, in the order printed: label, key, better when.
PAIRED = (
    ("KL at P", "kl", "lower"),
    ("FVE", "fve", "higher"),
    ("M's top-5 in the text, own − deranged (words)", "top5", "higher"),
    ("M's top-5 in the text, own − deranged (texts)", "top5_texts", "higher"),
    ("explanation NLL per token under M", "nll", "lower"),
    # Only where both lenses kept a context ceiling: its E, which chose neither text, reading it.
    ("KL at P, the context ceiling's E reading the text", "reader_kl", "lower"),
    ("FVE, the context ceiling's E reading the text", "reader_fve", "higher"),
)


# Rows a comparison has only where both results were read by the same context ceiling.
OPTIONAL_PAIRED = ("reader_kl", "reader_fve")


def paired_rows(result: dict) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of a paired comparison (`compare_results`): A, B, B − A and its CI."""
    headers = ["measure", "A", "B", "B − A", "95% CI (paired)", "better"]
    rows = [
        [
            label,
            result[key]["a"],
            result[key]["b"],
            result[key]["difference"],
            ci_text(result[key]["ci"]),
            better,
        ]
        for label, key, better in PAIRED
        if key in result or key not in OPTIONAL_PAIRED
    ]
    return headers, rows


def print_paired(result: dict) -> None:
    """Print a paired comparison of two lenses' eval results with `rich`."""
    from rich.console import Console

    headers, rows = paired_rows(result)
    a, b = result["names"]
    title = f"Paired on the same {result['num_samples']} samples: A = {a}, B = {b}"
    caption = f"B's KL lower on {fmt(100 * result['kl']['b_lower'], 1)}% of samples."
    if "reader_unpaired" in result:
        caption += f" The context ceilings' readings: {result['reader_unpaired']}."
    Console().print(_rich_table(title, headers, rows, 4, caption))
