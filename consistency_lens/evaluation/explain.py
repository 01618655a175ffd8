"""`consistency-lens explain`: what the lens says at every token position of a text."""

from __future__ import annotations

from html import escape
from pathlib import Path

import torch

from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.html import fmt, page, table
from consistency_lens.evaluation.saved_lens import load_lens, refuse_lens_dir
from consistency_lens.models.hooks import run_until
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import max_positions
from consistency_lens.models.patching import patched_kl, patched_kl_at
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


def _top(tokenizer, probs: torch.Tensor, ids: torch.Tensor) -> list[list]:
    """[[token text, probability], ...] of one row of `top_tokens`."""
    return [[tokenizer.decode([i]), p] for p, i in zip(probs.tolist(), ids.tolist(), strict=True)]


def _positions(tokenizer, text: str, ids: list[int]) -> range:
    """The positions of the user's text (a BOS the tokenizer added is not part of it)."""
    first = len(ids) - len(tokenizer(text, add_special_tokens=False).input_ids)
    return range(max(0, min(first, len(ids) - 1)), len(ids))


def _score(lens, ids: list[int], positions: list[int], A, A_hat, top_k: int, prefix=None):
    """KL at each P with Â patched in, the cosine, and (with `top_k`) both top-k lists: read from
    the text's one clean pass (`prefix`, from `shared_prefix`) or, without one, from left-padded
    prefixes 0..P."""
    if prefix is not None:
        out = patched_kl_at(lens.orig, prefix, positions, A, [A_hat], top_k=top_k)
    else:
        prefixes, mask = left_pad(
            [torch.tensor(ids[: p + 1]) for p in positions], lens.loaded.pad_id
        )
        out = patched_kl(
            lens.orig, prefixes.to(lens.device), mask.to(lens.device), A, [A_hat], top_k=top_k
        )
    (kl,), tops = out if top_k > 0 else (out, None)
    return kl, metrics.cosine_per_sample(A, A_hat), tops


def _shared(lens, ids: list[int]):
    """The text's clean pass, run once, where the model allows it (else None: padded prefixes)."""
    if not lens.orig.shares_prefix(len(ids)):
        return None
    return lens.orig.shared_prefix(torch.tensor([ids], device=lens.device))


@torch.no_grad()
def explain_text(lens, text: str, batch_size: int = 16, top_k: int = 3) -> list[dict]:
    """For every text token: its explanation, the KL of the reconstruction at it, the cosine, and
    (with `top_k`) M's `top_k` next tokens at P beside those with the reconstruction patched in.

    All positions go through D, E and M in batches of `batch_size`; M reads the text once and
    each position's patched pass is one token over that pass's cache (`patched_kl_at`). The top-k
    come from the same patched pass as the KL, as `[[token, probability], ...]` under
    `top_model` and `top_lens`.
    """
    tokenizer = lens.loaded.tokenizer
    model = lens.orig.model
    ids = tokenize_text(tokenizer, text, max_positions(model))
    # One forward through block L gives A at every position at once (later blocks never run).
    hidden = run_until(model, lens.orig.block, input_ids=torch.tensor([ids], device=lens.device))[0]
    every = list(_positions(tokenizer, text, ids))
    prefix = _shared(lens, ids)
    rows = []
    for start in range(0, len(every), batch_size):
        positions = every[start : start + batch_size]
        A = hidden[positions].float()
        expl_ids, A_hat = lens.reconstruct(A, greedy=True)
        kl, cos, tops = _score(lens, ids, positions, A, A_hat, top_k, prefix)
        for row, p in enumerate(positions):
            out = {
                "position": p,
                "token": tokenizer.decode([ids[p]]),
                "explanation": tokenizer.decode(expl_ids[row].tolist()),
                "kl": float(kl[row]),
                "cosine": float(cos[row]),
            }
            if tops is not None:
                (m_probs, m_ids), (l_probs, l_ids) = tops
                out["top_model"] = _top(tokenizer, m_probs[row], m_ids[row])
                out["top_lens"] = _top(tokenizer, l_probs[row], l_ids[row])
            rows.append(out)
    return rows


@torch.no_grad()
def sample_explanations(
    lens, text: str, position: int, num: int, temperature: float = 1.0, seed: int = 0
) -> list[dict]:
    """`num` explanations sampled from D at one position of `text` (seeded: the same call gives
    the same texts), each with the KL and cosine of its reconstruction."""
    tokenizer = lens.loaded.tokenizer
    ids = tokenize_text(tokenizer, text, max_positions(lens.orig.model))
    if position not in _positions(tokenizer, text, ids):
        raise LensError(
            f"Position {position} is not a token of the text (it has positions "
            f"{_positions(tokenizer, text, ids).start}..{len(ids) - 1}); pick one of those."
        )
    hidden = run_until(
        lens.orig.model,
        lens.orig.block,
        input_ids=torch.tensor([ids[: position + 1]], device=lens.device),
    )[0]
    A = hidden[[position] * num].float()
    cuda = [lens.device] if torch.device(lens.device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        expl_ids, A_hat = lens.reconstruct(A, greedy=False, temperature=temperature)
    kl, cos, _ = _score(lens, ids, [position] * num, A, A_hat, 0)
    return [
        {
            "explanation": tokenizer.decode(expl_ids[i].tolist()),
            "kl": float(kl[i]),
            "cosine": float(cos[i]),
        }
        for i in range(num)
    ]


def _top_text(top: list[list], k: int = 3) -> str:
    """`'tok' 0.41, 'tok' 0.12` for the first `k` of a top-k list."""
    return ", ".join(f"{t!r} {p:.2f}" for t, p in top[:k])


def explain_html(rows: list[dict]) -> str:
    """A page where each token shows its explanation on hover, shaded by the KL of its
    reconstruction, with M's top-3 next tokens beside the reconstruction's."""
    top = max((r["kl"] for r in rows), default=1.0) or 1.0
    has_top = bool(rows) and "top_model" in rows[0]
    spans = []
    for r in rows:
        shade = 0.08 + 0.5 * r["kl"] / top
        tip = f"{r['explanation']!r}\nKL {fmt(r['kl'], 3)} · cosine {fmt(r['cosine'], 3)}"
        if has_top:
            tip += f"\nM next: {_top_text(r['top_model'])}\nÂ next: {_top_text(r['top_lens'])}"
        spans.append(
            f"<span class='tok' style='background: rgba(230, 80, 60, {shade:.2f})' "
            f"title='{escape(tip, quote=True)}'>{escape(r['token'])}"
            f"<span class='tip'>{escape(tip)}</span></span>"
        )
    headers = ["position", "token", "explanation", "KL", "cosine"]
    if has_top:
        headers += ["M's top-3 next", "top-3 with Â patched in"]
    table_rows = [
        [r["position"], repr(r["token"]), repr(r["explanation"]), r["kl"], r["cosine"]]
        + ([_top_text(r["top_model"]), _top_text(r["top_lens"])] if has_top else [])
        for r in rows
    ]
    body = (
        "<p class='muted'>Hover a token to read the lens's explanation of the activation at it. "
        "Redder tokens have a larger KL(M(A) ‖ M(Â)): the explanation there keeps less of what "
        "the model holds. The last two columns set what M was about to say (its top-3 next "
        "tokens) beside what it says with the reconstruction Â patched in at that token.</p>"
        f"<div class='text-flow'>{''.join(spans)}</div>"
        "<h2>Every position</h2>" + table(headers, rows=table_rows, css_class="explain")
    )
    return page("Consistency lens: explanations", body)


def print_explanations(rows: list[dict]) -> None:
    """Print the per-token explanations as a `rich` table, with both top-3 lists when present."""
    from rich.console import Console
    from rich.table import Table

    has_top = bool(rows) and "top_model" in rows[0]
    out = Table(title="Explanation at every token position", title_justify="left")
    columns = [
        ("pos", "right"),
        ("token", "left"),
        ("explanation", "left"),
        ("KL", "right"),
        ("cosine", "right"),
    ]
    if has_top:
        columns += [("M next (top-3)", "left"), ("with Â (top-3)", "left")]
    for name, justify in columns:
        out.add_column(name, justify=justify)
    for r in rows:
        cells = [
            str(r["position"]),
            repr(r["token"]),
            repr(r["explanation"]),
            fmt(r["kl"], 3),
            fmt(r["cosine"], 3),
        ]
        if has_top:
            cells += [_top_text(r["top_model"]), _top_text(r["top_lens"])]
        out.add_row(*cells)
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
