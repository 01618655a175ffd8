"""Qualitative samples: a fixed, seeded set of validation activations and what the lens says."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import CollateFn
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.html import fmt, page
from consistency_lens.evaluation.specificity import explanation_words
from consistency_lens.models.patching import patched_kl
from consistency_lens.utils.io import atomic_write_text
from consistency_lens.utils.words import token_word

CONTEXT_TOKENS_SHOWN = 48
"""Tokens of context shown before P; older tokens are elided so the table stays readable."""


def sample_indices(n_total: int, n: int, seed: int) -> list[int]:
    """The first `n` indices of a seeded permutation of the split (the same on every run)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[: min(n, n_total)].tolist()


def top1_hit(tokenizer, explanation: list[int], top1: int) -> bool | None:
    """Whether M's top-1 token is one of the explanation's words; None when it is no word."""
    word = token_word(tokenizer, top1)
    return (word in explanation_words(tokenizer, explanation)) if word else None


def _top1_cell(rec: dict) -> str:
    # Pages written before the top-1 column existed have no such field.
    if "top1" not in rec:
        return "<td></td>"
    mark = {True: "in the text", False: "not in the text", None: "no word"}
    return (
        f"<td>{escape(repr(rec['top1']))} "
        f"<span class='muted small'>{mark[rec['top1_in_explanation']]}</span></td>"
    )


@torch.no_grad()
def qualitative_samples(lens, dataset, cfg: LensConfig) -> list[dict]:
    """Greedy and sampled explanations, with the KL of each reconstruction, for N fixed samples."""
    tokenizer = lens.loaded.tokenizer
    indices = sample_indices(len(dataset), cfg.eval.qualitative, cfg.seed + 1)
    if not indices:
        return []
    k = cfg.eval.num_sampled
    t_text = lens.cfg.train.t_text
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    # Sampling is seeded so that the page is the same on every run of the same lens.
    torch.manual_seed(cfg.seed)
    records = []
    for start in range(0, len(indices), cfg.eval.batch_size):
        chunk = indices[start : start + cfg.eval.batch_size]
        batch = collate([dataset[i] for i in chunk]).to(lens.device)
        A = batch.A
        greedy_ids, greedy_hat = lens.reconstruct(A, greedy=True)
        patches = [greedy_hat]
        sampled_ids = []
        for _ in range(k):
            ids = lens.decoder.generate(A, t_text, greedy=False, temperature=cfg.eval.temperature)
            sampled_ids.append(ids)
            patches.append(lens.encode_ids(ids))
        kls, clean = patched_kl(
            lens.orig, batch.input_ids_A, batch.attention_mask_A, A, patches, return_clean=True
        )
        top1 = clean.argmax(-1).tolist()
        cos = metrics.cosine_per_sample(A, greedy_hat)
        for row, index in enumerate(chunk):
            context = dataset.sample(index)[0].tolist()
            shown = context[-CONTEXT_TOKENS_SHOWN:]
            records.append(
                {
                    "index": int(index),
                    "position": len(context) - 1,
                    "context_elided": len(context) - len(shown),
                    "context_tokens": [tokenizer.decode([t]) for t in shown],
                    "greedy": tokenizer.decode(greedy_ids[row].tolist()),
                    "kl": float(kls[0][row]),
                    "cosine": float(cos[row]),
                    "sampled": [tokenizer.decode(ids[row].tolist()) for ids in sampled_ids],
                    "sampled_kl": [float(kl[row]) for kl in kls[1:]],
                    "top1": tokenizer.decode([top1[row]]),
                    "top1_in_explanation": top1_hit(tokenizer, greedy_ids[row].tolist(), top1[row]),
                }
            )
    return records


def context_html(record: dict) -> str:
    """The context with the token at P highlighted (older tokens elided)."""
    tokens = record["context_tokens"]
    prefix = f"<span class='muted'>…({record['context_elided']} tokens) </span>"
    body = "".join(escape(t) for t in tokens[:-1])
    marked = f"<span class='p-token' title='position P = {record['position']}'>{escape(tokens[-1])}</span>"
    return (prefix if record["context_elided"] else "") + body + marked


def samples_fragment(records: list[dict]) -> str:
    """An HTML table of qualitative samples (for the samples page and the report)."""
    if not records:
        return "<p class='muted'>No qualitative samples.</p>"
    rows = []
    for rec in records:
        sampled = "".join(
            f"<div class='expl'>{escape(repr(text))} <span class='muted small'>KL {fmt(kl, 3)}</span></div>"
            for text, kl in zip(rec["sampled"], rec["sampled_kl"], strict=True)
        )
        rows.append(
            f"<tr><td class='num'>{rec['index']}</td>"
            f"<td class='ctx'>{context_html(rec)}</td>"
            f"<td class='expl'>{escape(repr(rec['greedy']))}</td>"
            f"<td class='num'>{fmt(rec['kl'], 3)}</td><td class='num'>{fmt(rec['cosine'], 3)}</td>"
            f"{_top1_cell(rec)}<td>{sampled}</td></tr>"
        )
    head = (
        "<tr><th>sample</th><th>context (P highlighted)</th><th>explanation</th>"
        "<th>KL</th><th>cosine</th><th>M's top-1 at P</th><th>sampled explanations</th></tr>"
    )
    return f"<table class='samples'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def specificity_fragment(spec: dict | None) -> str:
    """A few examples per specificity bucket: explanations whose words occur in their own sample."""
    from consistency_lens.evaluation.specificity import BUCKET_NAMES

    if not spec or not spec.get("examples"):
        return ""
    parts = [
        "<h2>Specificity examples</h2><p class='muted'>Samples whose explanation shares content "
        "words with its own bucket (the matched words are listed); an empty bucket had no hit.</p>"
    ]
    for bucket, rows in spec["examples"].items():
        parts.append(f"<h3>{escape(BUCKET_NAMES.get(bucket, bucket))}</h3>")
        if not rows:
            parts.append("<p class='muted small'>No explanation hits this bucket.</p>")
            continue
        body = "".join(
            f"<tr><td class='num'>{r['index']}</td><td class='expl'>{escape(repr(r['explanation']))}</td>"
            f"<td>{escape(', '.join(r['matched']))}</td><td class='ctx'>{escape(r['context'])}</td>"
            f"<td class='ctx'>{escape(r['next_tokens'])}</td></tr>"
            for r in rows
        )
        parts.append(
            "<table class='spec'><thead><tr><th>sample</th><th>explanation</th><th>matched</th>"
            f"<th>context window ending at P</th><th>next tokens</th></tr></thead><tbody>{body}"
            "</tbody></table>"
        )
    return "".join(parts)


def write_samples(
    records: list[dict], out_dir: Path, specificity: dict | None = None
) -> tuple[Path, Path]:
    """Write `samples.jsonl` and a self-contained `samples.html` (with specificity examples)."""
    jsonl = Path(out_dir) / "samples.jsonl"
    html_path = Path(out_dir) / "samples.html"
    atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    note = (
        "<p class='muted'>Each row: a validation activation A (block L, position P), the lens's "
        "explanation (written as its `decode` says), the KL(M(A) ‖ M(Â)) of its "
        "reconstruction at P, and D's own sampled "
        "explanations with theirs.</p>"
    )
    atomic_write_text(
        html_path,
        page(
            "Consistency lens: qualitative samples",
            note + samples_fragment(records) + specificity_fragment(specificity),
        ),
    )
    return jsonl, html_path


def read_samples(path: Path) -> list[dict]:
    """Records of a `samples.jsonl` (empty when the file is missing)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_samples_wandb(records: list[dict], cfg: LensConfig) -> None:
    """Log the samples as a `wandb.Table` (opens an offline/online run if none is active)."""
    import wandb

    run = wandb.run
    own_run = run is None
    if own_run:
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or f"{Path(cfg.train.run_dir).name}-eval",
            mode=cfg.wandb.mode,
            tags=cfg.wandb.tags,
            dir=str(cfg.train.run_dir),
            job_type="eval",
        )
    columns = ["index", "context", "greedy", "kl", "cosine", "sampled"]
    table = wandb.Table(columns=columns)
    for rec in records:
        context = "".join(rec["context_tokens"][:-1]) + f"[[{rec['context_tokens'][-1]}]]"
        table.add_data(
            rec["index"],
            context,
            rec["greedy"],
            rec["kl"],
            rec["cosine"],
            " | ".join(rec["sampled"]),
        )
    run.log({"qualitative_samples": table})
    if own_run:
        run.finish()
