"""Words of decoded tokens, as the eval's specificity and GRPO's prediction reward read them.

A token is decoded alone (special tokens decode to nothing), lower-cased and kept to its letters and
digits; a content word is such a word that is no stop-word and no single letter (digits stay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class Tokenizer(Protocol):
    """What the word rules need of a tokenizer: decoding ids, special tokens dropped on request
    (a Hugging Face tokenizer; the tests' word-per-id stand-ins)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class Vocabulary(Tokenizer, Protocol):
    """A tokenizer whose vocabulary size is known (`content_word_ids` reads every entry)."""

    def __len__(self) -> int: ...


STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves s t d ll m re ve also us""".split()
)


TOP_PREDICTIONS = 5
"""M's top predictions at P that count as its prediction: the eval's top-5 bucket and top-1
counts read them, GRPO's prediction reward rewards naming one, and `warm_start_predict` with
`train.predict.first=content` picks its first token among them."""


def normalise(piece: str) -> str:
    """Lower-cased letters and digits of a decoded token ('' when nothing is left)."""
    return "".join(ch for ch in piece.lower() if ch.isalnum())


def is_content_word(word: str) -> bool:
    """Whether a normalised word is a content word (what `content_words` keeps)."""
    return bool(word) and word not in STOP_WORDS and (len(word) > 1 or word.isdigit())


def token_word(tokenizer: Tokenizer, tid: int) -> str:
    """The word of one token id, decoded alone and normalised, stop-words kept ('' when nothing is
    left: punctuation, whitespace, or a special token such as `<|im_end|>`, which is no word)."""
    return normalise(tokenizer.decode([int(tid)], skip_special_tokens=True))


def content_word(tokenizer: Tokenizer, tid: int) -> str:
    """The content word of one token id, decoded alone and normalised ('' when it has none)."""
    word = token_word(tokenizer, tid)
    return word if is_content_word(word) else ""


def content_words(tokenizer: Tokenizer, ids: Sequence[int]) -> set[str]:
    """The content words of token ids: each token decoded alone, normalised, stop-words dropped."""
    return {word for word in (content_word(tokenizer, tid) for tid in ids) if word}


def content_word_ids(tokenizer: Vocabulary, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: for each token id, an id of its content word (`content_words` of that
    token alone), shared by every token with the same word, or -1 when it has none.

    Two token ids map to the same value exactly when `content_words` gives both the same word, so
    word matches between texts become integer comparisons on the device.
    """
    index: dict[str, int] = {}
    out = torch.full((vocab_size,), -1, dtype=torch.long)
    # Rows past the tokenizer's vocabulary (a head padded to a round size) decode to no word.
    for tid in range(min(vocab_size, len(tokenizer))):
        if word := content_word(tokenizer, tid):
            out[tid] = index.setdefault(word, len(index))
    return out


def first_content_token(word_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pick for `greedy_continuation`: M's highest-ranked token among its top predictions whose
    word is a content word (`word_ids`, from `content_word_ids`), else its top-1."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top = logits.topk(min(TOP_PREDICTIONS, logits.shape[-1]), dim=-1).indices
        content = word_ids[top.to(word_ids.device)].to(top.device) >= 0
        # argmax of a bool row is its first True (rank order), 0 (the top-1) when none is.
        return top.gather(1, content.long().argmax(1, keepdim=True)).squeeze(1)

    return pick


def names_prediction(
    words: torch.Tensor, text_ids: torch.Tensor, top_ids: torch.Tensor
) -> torch.Tensor:
    """(n, K) float: 1 where text j of row i (`text_ids` (n, K, T)) holds a content word of row
    i's predictions (`top_ids` (n, k)); `words` maps token ids to content-word ids, -1 for none
    (`content_word_ids`)."""
    text, top = words[text_ids], words[top_ids]  # (n, K, T), (n, k)
    same = text.unsqueeze(-1) == top[:, None, None, :]  # (n, K, T, k)
    return (same & (text >= 0).unsqueeze(-1)).flatten(2).any(-1).float()
