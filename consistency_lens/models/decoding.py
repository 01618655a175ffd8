"""Best-of-N explanations: D's greedy text and `decode.samples` sampled texts, of which the lens
keeps the one of highest score. The score reads A alone (D's likelihood of the text given A, the
text's fluency under M, whether it holds a content word, whether it names what M predicts from A
written into a fixed prompt), never the context or E, so the
explanation stays a function of the activation; the eval's KL is measured on the text kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from consistency_lens.config import DecodeConfig
from consistency_lens.models.decoder import placeholder_id, prompt_token_ids
from consistency_lens.models.patching import token_nll
from consistency_lens.utils.words import names_prediction

# The most fp32 log-probabilities (candidates x batch x T x vocabulary) one scoring forward holds:
# 2^28 elements, 1 GiB; 64 activations x 18 candidates x 4 tokens x 49,152 fit in one.
_LOGITS_BUDGET = 1 << 28

if TYPE_CHECKING:
    from consistency_lens.models.lens import ConsistencyLens


def explanation_scores(
    d_logprob: torch.Tensor,
    text_nll: torch.Tensor,
    has_content: torch.Tensor,
    cfg: DecodeConfig,
    named: torch.Tensor | None = None,
) -> torch.Tensor:
    """`d_logprob - fluency * max(0, text_nll - fluency_margin) + content * has_content +
    prediction * named`, per candidate (all tensors of one shape; `d_logprob` and `text_nll` are
    means per token; `named`, 1 where the text names M's prediction, may be None while
    `cfg.prediction` is 0;
    `cfg` filled, `DecodeConfig.filled`)."""
    over = (text_nll - cfg.fluency_margin).clamp(min=0)
    score = d_logprob - cfg.fluency * over + cfg.content * has_content.to(d_logprob.dtype)
    if cfg.prediction:
        score = score + cfg.prediction * named.to(d_logprob.dtype)
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
    and, with `cfg.prediction`, D's greedy text begun with M's prediction from A alone.

    The draws come from a private generator seeded with `cfg.seed`, one noise row per step
    shared by the batch: a row's explanation depends on its activation and the settings alone
    (not on its batch or the caller's random state), so a sentence is explained the same way on
    every call, and the caller's random state is left as it was.
    """
    cfg = cfg.filled()
    t_text = lens.cfg.train.t_text
    batch = activations.shape[0]
    generator = torch.Generator(device=activations.device).manual_seed(cfg.seed)
    candidates = [lens.decoder.generate(activations, t_text, greedy=True)]
    for _ in range(cfg.samples):
        candidates.append(
            lens.decoder.generate(
                activations, t_text, greedy=False, temperature=cfg.temperature, generator=generator
            )
        )
    words = lens.orig.content_word_ids()
    top = None
    if cfg.prediction:
        top = prediction_from_activation(lens, activations, cfg.prediction_top).to(words.device)
        # One more candidate: D's greedy text from the best-ranked of those predictions that is
        # a content word (the top-1 when none is), which D then continues as it would its own.
        content = words[top] >= 0
        first = top.gather(1, content.long().argmax(1, keepdim=True)).squeeze(1)
        candidates.append(lens.decoder.generate(activations, t_text, greedy=True, first=first))
    ids = torch.stack(candidates, 1)  # (B, n, T)
    d_logprob, nll = _candidate_likelihoods(lens, activations, ids)
    text = ids.to(words.device)
    has_content = (words[text] >= 0).any(-1)
    named = None if top is None else names_prediction(words, text, top).to(d_logprob.device)
    scores = explanation_scores(
        d_logprob.float(), nll.float(), has_content.to(d_logprob.device), cfg, named
    )
    best = scores.argmax(1)  # the first of equal maxima: the greedy text wins a tie
    return ids[torch.arange(batch, device=ids.device), best]


def _candidate_likelihoods(
    lens: ConsistencyLens, activations: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) mean log p_D(text | A) and M's mean NLL of each candidate text of `ids` (B, n, T),
    as many candidates per forward as keep its fp32 log-probabilities within `_LOGITS_BUDGET`
    elements (all of them at the shipped sizes, so a large vocabulary or batch cannot run out of
    memory while smaller ones score exactly as one forward does)."""
    batch, n, t = ids.shape
    vocab = lens.orig.content_word_ids().shape[0]
    per = max(1, min(n, _LOGITS_BUDGET // (batch * t * vocab)))
    d_parts, m_parts = [], []
    for start in range(0, n, per):
        chunk = ids[:, start : start + per]
        k = chunk.shape[1]
        flat = chunk.flatten(0, 1)
        logits = lens.decoder.teacher_forced_logits(activations.repeat_interleave(k, 0), flat)
        d_parts.append(-token_nll(logits, flat).view(batch, k))
        m_parts.append(lens.orig.text_nll(flat.to(lens.orig.device)).view(batch, k))
    return torch.cat(d_parts, 1), torch.cat(m_parts, 1).to(d_parts[0].device)
