"""`report.html`: training curves, the eval table with baselines and the qualitative samples."""

from __future__ import annotations

from html import escape
from pathlib import Path

from consistency_lens.errors import LensError
from consistency_lens.evaluation.html import page, table
from consistency_lens.evaluation.samples import (
    read_samples,
    samples_fragment,
    specificity_fragment,
)
from consistency_lens.evaluation.tables import result_tables
from consistency_lens.models.lens import CONFIG_FILE
from consistency_lens.utils.io import atomic_write_text, read_json
from consistency_lens.utils.logging import MetricsFile

# Curves every run has; the objective's own terms and coefficients are added by `curves_for`.
_VAL_CURVES: list[tuple[str, list[str], bool]] = [
    ("Validation KL of the direct reconstruction", ["val_kl"], True),
    ("Validation FVE", ["val_fve"], False),
    ("Validation MSE", ["val_mse"], True),
]


def curves_for(objective: str = "plan") -> list[tuple[str, list[str], bool]]:
    """(title, metrics.jsonl keys drawn on one plot, log-scale y) for a run of `objective`."""
    from consistency_lens.training.objectives import objective_class

    cls = objective_class(objective)
    titles = cls.term_titles
    # Each loss name is drawn with its value on validation batches (`val_<name>`) when logged.
    curves = [("Total loss", ["loss", "val_loss"], True)]
    curves += [(titles.get(t, t), [t, f"val_{t}"], t not in cls.linear_terms) for t in cls.terms]
    curves += _VAL_CURVES
    curves += [(titles.get(c, f"coefficient {c}"), [c], False) for c in cls.coefficients]
    return curves + [("Learning rate", ["lr"], True)]


def run_objective(run_dir: Path) -> str:
    """The objective a run trained with: from its saved lens, else from its newest checkpoint
    (a run stopped before it saved a lens), else `plan`."""
    from consistency_lens.training.checkpoint import list_checkpoints, read_config

    lens_config = Path(run_dir) / "lens" / CONFIG_FILE
    checkpoints = list_checkpoints(run_dir)
    try:
        if lens_config.is_file():
            config = read_json(lens_config, "Lens config").get("config", {})
        elif checkpoints:
            config = read_config(checkpoints[-1][1])
        else:
            return "plan"
    except LensError:  # a damaged file costs the report its objective's curves, not the report
        return "plan"
    return str(config.get("train", {}).get("objective", "plan"))


def curve_figures(rows: list[dict], objective: str = "plan") -> list[str]:
    """One plotly `<div>` (no plotly.js inside) per curve of `objective`'s run that has data."""
    import plotly.graph_objects as go

    divs = []
    for i, (title, keys, log_y) in enumerate(curves_for(objective)):
        fig = go.Figure()
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=key))
        if not fig.data:
            continue
        positive = all(v > 0 for trace in fig.data for v in trace.y)
        fig.update_layout(
            title=title,
            xaxis_title="step",
            yaxis_type="log" if log_y and positive else "linear",
            margin=dict(l=50, r=20, t=50, b=45),
            showlegend=len(keys) > 1,
            template="plotly_white",
        )
        html = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"curve-{i}",
            default_height="320px",
            config={"displayModeBar": False},
        )
        divs.append(f"<div class='plot'>{html}</div>")
    return divs


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    # Inline so that the report opens offline and can be mailed as one file.
    return f"<script type='text/javascript'>{get_plotlyjs()}</script>"


def eval_section(results: dict | None) -> str:
    """The eval tables as HTML, or a note when the lens has not been evaluated."""
    if results is None:
        return "<p class='muted'>No eval_results.json yet; run `consistency-lens eval`.</p>"
    parts = [
        f"<p class='small muted'>lens: {escape(str(results.get('checkpoint', '')))} · model "
        f"{escape(str(results.get('model', '')))} · layer {results.get('layer')} · "
        f"T_text {results.get('t_text')}</p>"
    ]
    for title, headers, rows, note in result_tables(results):
        parts.append(f"<h3>{escape(title)}</h3>")
        parts.append(table(headers, rows, "eval"))
        parts.append(f"<p class='small muted'>{escape(note)}</p>")
    return "".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` from metrics.jsonl, eval_results.json and samples.jsonl."""
    run_dir = Path(run_dir)
    rows = [
        r
        for r in MetricsFile(run_dir / "metrics.jsonl").read()
        if isinstance(r, dict) and "step" in r
    ]
    results_path = run_dir / "eval_results.json"
    results = read_json(results_path, "Eval results") if results_path.is_file() else None
    samples = read_samples(run_dir / "samples.jsonl")
    figures = curve_figures(rows, run_objective(run_dir))
    curves = (
        f"<div class='grid'>{''.join(figures)}</div>"
        if figures
        else "<p class='muted'>No metrics.jsonl rows yet; train a lens first.</p>"
    )
    last = rows[-1]["step"] if rows else None
    summary = f"<p class='muted'>Run directory: {escape(str(run_dir.resolve()))}" + (
        f" · last logged step {last}</p>" if last is not None else "</p>"
    )
    body = (
        summary
        + "<h2>Training curves</h2>"
        + curves
        + "<h2>Evaluation against baselines</h2>"
        + eval_section(results)
        + "<h2>Qualitative samples</h2>"
        + samples_fragment(samples)
        + specificity_fragment((results or {}).get("specificity"))
    )
    out = run_dir / "report.html"
    head = _plotly_js() if figures else ""
    atomic_write_text(out, page(f"Consistency lens report: {run_dir.name}", body, head))
    return out
