"""`consistency-lens explain`: what the lens says at every token position of a text."""

from __future__ import annotations

from html import escape
from pathlib import Path

import torch

from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.evaluate import load_lens, refuse_lens_dir
from consistency_lens.evaluation.html import fmt, page, table
from consistency_lens.models.hooks import run_until
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import max_positions
from consistency_lens.models.patching import patched_kl
from consistency_lens.utils.io import atomic_write_text


def tokenize_text(tokenizer, text: str, max_positions: int | None) -> list[int]:
    """Token ids as the dump would see them (BOS added when the tokenizer adds one), or a clear error."""
    if not tokenizer(text, add_special_tokens=False).input_ids:
        raise LensError("The text to explain is empty; give at least one token of text.")
    ids = tokenizer(text).input_ids
    if max_positions is not None and len(ids) > max_positions:
        raise LensError(
            f"The text is {len(ids)} tokens long but the model reads at most {max_positions}; "
            "explain a shorter text."
        )
    return ids


@torch.no_grad()
def explain_text(lens, text: str, batch_size: int = 16) -> list[dict]:
    """For every text token: its explanation, the KL of the reconstruction at it, and the cosine."""
    tokenizer = lens.loaded.tokenizer
    model = lens.orig.model
    device = lens.device
    ids = tokenize_text(tokenizer, text, max_positions(model))
    # One forward through block L gives A at every position at once (later blocks never run).
    hidden = run_until(model, lens.orig.block, input_ids=torch.tensor([ids], device=device))[0]
    # A BOS the tokenizer added is not part of the user's text, so it gets no row.
    first = len(ids) - len(tokenizer(text, add_special_tokens=False).input_ids)
    first = max(0, min(first, len(ids) - 1))
    pad = lens.loaded.pad_id
    rows = []
    for start in range(first, len(ids), batch_size):
        positions = list(range(start, min(start + batch_size, len(ids))))
        A = hidden[positions].float()
        expl_ids, A_hat = lens.reconstruct(A, greedy=True)
        prefixes, mask = left_pad([torch.tensor(ids[: p + 1]) for p in positions], pad)
        (kl,) = patched_kl(lens.orig, prefixes.to(device), mask.to(device), A, [A_hat])
        cos = metrics.cosine_per_sample(A, A_hat)
        for row, p in enumerate(positions):
            rows.append(
                {
                    "position": p,
                    "token": tokenizer.decode([ids[p]]),
                    "explanation": tokenizer.decode(expl_ids[row].tolist()),
                    "kl": float(kl[row]),
                    "cosine": float(cos[row]),
                }
            )
    return rows


def explain_html(rows: list[dict]) -> str:
    """A page where each token shows its explanation on hover, shaded by the KL of its reconstruction."""
    top = max((r["kl"] for r in rows), default=1.0) or 1.0
    spans = []
    for r in rows:
        shade = 0.08 + 0.5 * r["kl"] / top
        tip = f"{r['explanation']!r}\nKL {fmt(r['kl'], 3)} · cosine {fmt(r['cosine'], 3)}"
        spans.append(
            f"<span class='tok' style='background: rgba(230, 80, 60, {shade:.2f})' "
            f"title='{escape(tip, quote=True)}'>{escape(r['token'])}"
            f"<span class='tip'>{escape(tip)}</span></span>"
        )
    table_rows = [
        [r["position"], repr(r["token"]), repr(r["explanation"]), r["kl"], r["cosine"]]
        for r in rows
    ]
    body = (
        "<p class='muted'>Hover a token to read the lens's explanation of the activation at it. "
        "Redder tokens have a larger KL(M(A) ‖ M(Â)): the explanation there keeps less of what "
        "the model holds.</p>"
        f"<div class='text-flow'>{''.join(spans)}</div>"
        "<h2>Every position</h2>"
        + table(
            ["position", "token", "explanation", "KL", "cosine"],
            rows=table_rows,
            css_class="explain",
        )
    )
    return page("Consistency lens: explanations", body)


def print_explanations(rows: list[dict]) -> None:
    """Print the per-token explanations as a `rich` table."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title="Explanation at every token position", title_justify="left")
    for name, justify in [
        ("pos", "right"),
        ("token", "left"),
        ("explanation", "left"),
        ("KL", "right"),
        ("cosine", "right"),
    ]:
        out.add_column(name, justify=justify)
    for r in rows:
        out.add_row(
            str(r["position"]),
            repr(r["token"]),
            repr(r["explanation"]),
            fmt(r["kl"], 3),
            fmt(r["cosine"], 3),
        )
    Console().print(out)


def explain_command(
    cfg: LensConfig, checkpoint: Path | None, text: str, html: Path | None
) -> list[dict]:
    """Explain every position of `text` with a saved lens; print a table, optionally write HTML."""
    lens, path = load_lens(cfg, checkpoint, shipped_fallback=True)
    if html is not None:
        refuse_lens_dir(Path(html).parent, path, "Explain page")
    rows = explain_text(lens, text, cfg.eval.batch_size)
    print_explanations(rows)
    if html is not None:
        atomic_write_text(Path(html), explain_html(rows))
        print(f"explanations page: {html}")
    return rows
