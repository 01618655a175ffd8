"""Best-of-N explanations: D's greedy text and `decode.samples` sampled texts, of which the lens
keeps the one of highest score. The score reads A alone (D's likelihood of the text given A, the
text's fluency under M, whether it holds a content word, whether it names what M predicts from A
written into a fixed prompt and, with `decode.reconstruction`, how close E's reconstruction from
the text comes to A), never the context or M's output at P, so the explanation stays a function
of the activation; the eval's KL is measured on the text kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from consistency_lens.config import DecodeConfig
from consistency_lens.models.decoder import gumbel_noise, placeholder_id, prompt_token_ids
from consistency_lens.utils.words import names_prediction

# The most fp32 logits (rows x candidates x T x vocabulary) one chunk of rows writes and scores:
# 2^28 elements, 1 GiB (its largest tensor, M's logits of the candidates; the peak is a small
# multiple); 64 activations x 18 candidates x 4 tokens x 49,152 fit in one chunk.
_LOGITS_BUDGET = 1 << 28

if TYPE_CHECKING:
    from consistency_lens.models.lens import ConsistencyLens


def explanation_scores(
    d_logprob: torch.Tensor,
    text_nll: torch.Tensor,
    has_content: torch.Tensor,
    cfg: DecodeConfig,
    named: torch.Tensor | None = None,
    error: torch.Tensor | None = None,
) -> torch.Tensor:
    """`d_logprob - fluency * max(0, text_nll - fluency_margin) + content * has_content +
    prediction * named - reconstruction * error`, per candidate (all tensors of one shape;
    `d_logprob` and `text_nll` are means per token; `named`, 1 where the text names M's
    prediction, and `error`, E's relative squared error, may be None while their weight is 0;
    `cfg` filled, `DecodeConfig.filled`)."""
    over = (text_nll - cfg.fluency_margin).clamp(min=0)
    score = d_logprob - cfg.fluency * over + cfg.content * has_content.to(d_logprob.dtype)
    if cfg.prediction:
        score = score + cfg.prediction * named.to(d_logprob.dtype)
    if cfg.reconstruction:
        score = score - cfg.reconstruction * error.to(d_logprob.dtype)
    return score


@torch.no_grad()
def prediction_from_activation(
    lens: ConsistencyLens, activations: torch.Tensor, top: int, prompt: str | None = None
) -> torch.Tensor:
    """(B, top) the token ids M ranks highest next with A alone: D's prompt (or `prompt`, with
    its `<embed>` slot) up to its slot (the slot holding `PLACEHOLDER`) through M, A written over
    the slot's state after block L, M's next-token logits there (a patchscope). The context of A
    is never read."""
    tokenizer = lens.loaded.tokenizer
    left, _ = prompt_token_ids(tokenizer, prompt or lens.cfg.train.prompt)
    ids = torch.tensor([[*left, placeholder_id(tokenizer)]], device=lens.orig.device)
    ids = ids.expand(activations.shape[0], -1)
    (logits,) = lens.orig.forward_with_replacement(
        ids, torch.ones_like(ids), [activations.to(lens.orig.device)]
    )
    return logits.topk(min(top, logits.shape[-1]), dim=-1).indices


@torch.no_grad()
def best_of_samples(
    lens: ConsistencyLens, activations: torch.Tensor, cfg: DecodeConfig
) -> torch.Tensor:
    """Token ids (B, T_text) of the best-scoring text among D's greedy one and `cfg.samples`
    sampled ones for each activation (ties go to the greedy text, then to the earlier sample),
    and, with `cfg.prediction`, D's greedy text written from M's prediction from A alone.

    The draws come from a private generator seeded with `cfg.seed`, one noise row per step and
    sample shared by the batch: a row's explanation depends on its activation and the settings
    alone (not on its batch or the caller's random state), so a sentence is explained the same
    way on every call, and the caller's random state is left as it was. That is also why the
    batch can be cut into chunks of rows, which keeps the candidates' logits within
    `_LOGITS_BUDGET` whatever the batch, candidates or vocabulary.
    """
    cfg = cfg.filled()
    words = lens.orig.content_word_ids()
    n = 1 + cfg.samples + (1 if cfg.prediction else 0)
    rows = max(1, _LOGITS_BUDGET // (n * lens.cfg.train.t_text * words.shape[0]))
    chunks = [
        _best_of_rows(lens, activations[start : start + rows], cfg)
        for start in range(0, activations.shape[0], rows)
    ]
    return torch.cat(chunks) if chunks else activations.new_zeros(0, lens.cfg.train.t_text).long()


def _best_of_rows(
    lens: ConsistencyLens, activations: torch.Tensor, cfg: DecodeConfig
) -> torch.Tensor:
    """`best_of_samples` for one chunk of rows (`cfg` filled)."""
    words = lens.orig.content_word_ids()
    top, first = None, None
    if cfg.prediction:
        top = prediction_from_activation(lens, activations, cfg.prediction_top).to(words.device)
        # One more candidate: D's greedy text from the best-ranked of those predictions that is
        # a content word (the top-1 when none is), which D then continues as it would its own.
        content = words[top] >= 0
        first = top.gather(1, content.long().argmax(1, keepdim=True)).squeeze(1)
    ids, d_logprob = _write_candidates(lens, activations, cfg, first)
    text = ids.to(words.device)
    has_content = (words[text] >= 0).any(-1)
    named = None if top is None else names_prediction(words, text, top).to(d_logprob.device)
    nll, error = _read_texts(lens, activations, ids, cfg)
    scores = explanation_scores(
        d_logprob.float(), nll.float(), has_content.to(d_logprob.device), cfg, named, error
    )
    best = scores.argmax(1)  # the first of equal maxima: the greedy text wins a tie
    return ids[torch.arange(ids.shape[0], device=ids.device), best]


def _write_candidates(
    lens: ConsistencyLens,
    activations: torch.Tensor,
    cfg: DecodeConfig,
    first: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All candidates in one batched generation: ids (B, n, T) and D's mean log-probability per
    token of each (B, n), for n = D's greedy text, then `cfg.samples` draws, then (with `first`)
    D's greedy text from the token `first` (B,).

    Sample s draws with the noise row that drawing one row per step for each sample in turn from
    a generator seeded with `cfg.seed` would give (torch's generator streams its values in order),
    shared by the batch."""
    batch, t_text, samples = activations.shape[0], lens.cfg.train.t_text, cfg.samples
    n = 1 + samples + (first is not None)
    generator = torch.Generator(device=activations.device).manual_seed(cfg.seed)
    noise: list[torch.Tensor] = []

    def choose(t: int, logits: torch.Tensor) -> torch.Tensor:
        by_candidate = logits.view(n, batch, -1)
        picked = by_candidate.argmax(dim=-1)  # (n, B)
        if samples:
            if not noise:
                shape = (samples, t_text, 1, logits.shape[-1])
                noise.append(gumbel_noise(logits.new_empty(shape), generator))
            scaled = by_candidate[1 : 1 + samples].float() / cfg.temperature
            picked[1 : 1 + samples] = (scaled + noise[0][:, t]).argmax(dim=-1)
        if t == 0 and first is not None:
            picked[-1] = first.to(picked.device)
        return picked.flatten()

    rows = torch.arange(batch, device=activations.device).repeat(n)
    ids, logprob = lens.decoder.write(activations, t_text, choose, rows)
    return ids.view(n, batch, t_text).transpose(0, 1), logprob.view(n, batch).T


def _read_texts(
    lens: ConsistencyLens, activations: torch.Tensor, ids: torch.Tensor, cfg: DecodeConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, n) M's mean NLL per token of each candidate of `ids` (B, n, T) and, with
    `cfg.reconstruction`, E's relative squared error `||E(text) - A||^2 / ||A||^2` (else None);
    each distinct text is read once (D's draws often repeat its greedy text)."""
    flat = ids.flatten(0, 1)
    distinct, index = torch.unique(flat, dim=0, return_inverse=True)
    nll = lens.orig.text_nll(distinct.to(lens.orig.device))[index].view(ids.shape[:2])
    if not cfg.reconstruction:
        return nll.to(ids.device), None
    a = activations.float()
    rebuilt = lens.encoder.encode_ids(distinct).float()[index].view(*ids.shape[:2], -1)
    error = (rebuilt - a[:, None]).pow(2).sum(-1) / a.pow(2).sum(-1, keepdim=True)
    return nll.to(ids.device), error.to(ids.device)
