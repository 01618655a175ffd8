"""Specificity (docs/design.md section 5): is a sample's explanation about *that* sample?

An explanation's content words (each token decoded alone, special tokens dropped, lower-cased,
letters and digits only, stop-words and single letters dropped) are looked up in three buckets of
its own sample: the context window ending at P, the corpus tokens after P (`input_ids_next`) and
M's top-5 predictions at P, and in the same buckets of another sample under the eval's
derangement. A lens whose texts say something about their activation hits its own buckets more
often; a collapsed lens (one text for every sample) hits both equally, exactly, because a
derangement is a bijection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from consistency_lens.evaluation import metrics
from consistency_lens.utils.words import Tokenizer, is_content_word, normalise, token_word

BUCKETS = ("context", "next_tokens", "top5", "any")
BUCKET_NAMES = {
    "context": "context window ending at P",
    "next_tokens": "next corpus tokens after P",
    "top5": "M's top-5 predictions at P",
    "any": "any of the three",
}


def _hits(expl: list[set[str]], refs: list[set[str]], order: Sequence[int]) -> torch.Tensor:
    return torch.tensor(
        [len(e & refs[j]) for e, j in zip(expl, order, strict=True)], dtype=torch.float64
    )


def pooled_difference(own: torch.Tensor, other: torch.Tensor, count: torch.Tensor) -> float:
    """(Σ own hits − Σ deranged hits) / Σ counted, pooled over samples (NaN when none counted)."""
    total = float(count.sum())
    return float((own.sum() - other.sum()) / total) if total else float("nan")


def texts_named(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per text: 1 when it hits its own bucket and not the deranged one, −1 the reverse, else 0.

    Its mean is the text share's own − deranged, which does not fall as texts grow longer for the
    same hits (the word share does), so lenses of two `t_text` compare on it.
    """
    return (own > 0).double() - (other > 0).double()


def specificity(
    explanations: list[set[str]],
    buckets: dict[str, list[set[str]]],
    perm: Sequence[int] | None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Own and deranged hit rates per bucket, their difference and its paired bootstrap CI.

    A rate is (explanation words found in the bucket) / (explanation words), pooled over samples;
    `perm[i]` is the sample whose buckets explanation i is compared with under the derangement.
    The `texts_*` keys are the per-text rate beside it: the share of explanations (content-free
    ones included) with at least one word in the bucket. The word rate falls as texts grow
    longer for the same hits; the text rate does not, so lenses of two `t_text` compare on it.
    `per_sample` holds each sample's word count and hits, so two lenses compare paired.
    """
    n = len(explanations)
    count = torch.tensor([len(e) for e in explanations], dtype=torch.float64)
    refs = dict(buckets)
    refs["any"] = [set().union(*(buckets[b][i] for b in buckets)) for i in range(n)]
    total = float(count.sum())
    out: dict = {
        "content_words": int(total),
        "content_free_fraction": float((count == 0).double().mean()) if n else float("nan"),
        "buckets": {},
        "per_sample": {"words": count.int().tolist(), "own": {}, "deranged": {}},
    }
    if total == 0:
        out["unavailable"] = "no explanation has a content word (e.g. only punctuation)"
    elif perm is None:
        out["unavailable"] = "the derangement needs at least 2 evaluated samples"
    nan = float("nan")
    for name in BUCKETS:
        own = _hits(explanations, refs[name], range(n))
        out["per_sample"]["own"][name] = own.int().tolist()
        row = {"own": float(own.sum()) / total if total else nan}
        # A content-free text hits nothing, so it counts in the text share as a text without a hit.
        row["texts_own"] = float((own > 0).double().mean()) if n else nan
        if perm is not None:
            other = _hits(explanations, refs[name], perm)
            out["per_sample"]["deranged"][name] = other.int().tolist()
            # Per text, content-free texts counted as texts without a hit: defined whenever
            # there is a derangement, even when no text has a content word (then exactly 0).
            named = texts_named(own, other)
            row["texts_deranged"] = float((other > 0).double().mean())
            row["texts_difference"] = float(named.mean())
            row["texts_difference_ci"] = list(metrics.mean_ci(named, resamples, seed))
        else:
            row.update(texts_deranged=nan, texts_difference=nan, texts_difference_ci=[])
        if perm is not None and total:
            row["deranged"] = float(other.sum()) / total
            row["difference"] = row["own"] - row["deranged"]
            row["difference_ci"] = list(
                metrics.bootstrap_ci(
                    pooled_difference, own, other, count, resamples=resamples, seed=seed
                )
            )
        else:
            row.update(deranged=nan, difference=nan, difference_ci=[])
        out["buckets"][name] = row
    return out


def bucket_examples(
    explanations: list[set[str]],
    buckets: dict[str, list[set[str]]],
    records: list[dict],
    per_bucket: int,
) -> dict[str, list[dict]]:
    """Up to `per_bucket` samples per bucket whose explanation hits its own bucket, with the words."""
    out: dict[str, list[dict]] = {}
    for name in buckets:
        rows = []
        for i, words in enumerate(explanations):
            matched = sorted(words & buckets[name][i])
            if matched and len(rows) < per_bucket:
                rows.append({**records[i], "bucket": name, "matched": matched})
        out[name] = rows
    return out


def explanation_words(tokenizer: Tokenizer, ids: Sequence[int]) -> set[str]:
    """Every word of an explanation, stop-words kept: each token decoded alone and each
    whitespace-separated word of the whole decoded text, normalised (special tokens and '' dropped)."""
    words = [token_word(tokenizer, t) for t in ids]
    words += map(
        normalise, tokenizer.decode([int(t) for t in ids], skip_special_tokens=True).split()
    )
    return {w for w in words if w}


def _own_against_deranged(
    own: torch.Tensor, other: torch.Tensor | None, valid: torch.Tensor, resamples: int, seed: int
) -> dict:
    """Rates of `own` and `other` hits over the `valid` samples, their difference and its CI."""
    total = float(valid.sum())
    out: dict = {"own": float(own.sum()) / total if total else float("nan"), "counted": int(total)}
    if other is None or not total:
        out.update(deranged=float("nan"), difference=float("nan"), difference_ci=[])
        return out
    out["deranged"] = float(other.sum()) / total
    out["difference"] = out["own"] - out["deranged"]
    out["difference_ci"] = list(
        metrics.bootstrap_ci(pooled_difference, own, other, valid, resamples=resamples, seed=seed)
    )
    return out


def top1_in_explanation(
    tokenizer,
    explanations: Sequence[Sequence[int]],
    top1: Sequence[int],
    perm: Sequence[int] | None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """How often M's top-1 next token at P is one of its own explanation's words, against the
    same rate for another sample's top-1 under the derangement.

    The top-1 token is decoded alone and normalised like every word here (lower-cased, letters and
    digits only); a top-1 token with nothing left (whitespace, punctuation, a newline) is no word
    and is counted apart, never as a miss. Stop-words count: M's top-1 is often one. Rates are over
    the samples whose top-1 is a word (a derangement is a bijection, so both have that many).
    `content_top1` holds the same figures over the samples whose top-1 is a content word (no
    stop-word), where a hit names what M predicts rather than a function word any text may hold.
    """
    words = [explanation_words(tokenizer, ids) for ids in explanations]
    top = [token_word(tokenizer, t) for t in top1]
    n = len(top)
    valid = torch.tensor([bool(w) for w in top], dtype=torch.float64)
    content = torch.tensor([is_content_word(w) for w in top], dtype=torch.float64)
    own = torch.tensor([bool(top[i]) and top[i] in words[i] for i in range(n)], dtype=torch.float64)
    other = None
    if perm is not None:
        other = torch.tensor(
            [bool(top[j]) and top[j] in words[i] for i, j in enumerate(perm)], dtype=torch.float64
        )
    out = _own_against_deranged(own, other, valid, resamples, seed)
    out["not_a_word"] = n - out["counted"]
    out["per_sample"] = [
        {
            "top1": tokenizer.decode([int(t)]),
            "in_explanation": (top[i] in words[i]) if top[i] else None,
        }
        for i, t in enumerate(top1)
    ]
    if other is not None:
        # Another sample's top-1 counts only when it is a content word too.
        other_content = other * torch.tensor([content[j] for j in perm], dtype=torch.float64)
        # As for all words: a derangement is a bijection, so as many deranged top-1s as own ones
        # are content words, and both rates share that count.
        out["content_top1"] = _own_against_deranged(
            own * content, other_content, content, resamples, seed
        )
    else:
        out["content_top1"] = _own_against_deranged(own * content, None, content, resamples, seed)
    if perm is None or not out["counted"]:
        if not out["counted"]:
            out["unavailable"] = "no sample's top-1 token is a word (all punctuation or spaces)"
        else:
            out["unavailable"] = "the derangement needs at least 2 evaluated samples"
    return out
