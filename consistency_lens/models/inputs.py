"""Padded token batches as the models read them: left padding puts every row's P last."""

from __future__ import annotations

import torch

from consistency_lens.models.attention import attention_implementation, text_config


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def no_logits() -> torch.Tensor:
    """A `logits_to_keep` that keeps no position, for a pass run only for its kv cache."""
    # On the CPU: it indexes hidden states on any device (the head may sit on another GPU than
    # the embedding under device_map), and an empty index copies nothing.
    return torch.empty(0, dtype=torch.long)


def right_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors left-aligned; returns (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors right-aligned; returns (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


def causal_mask(
    attention_mask: torch.Tensor, query_length: int, config: object, dtype: torch.dtype
) -> torch.Tensor:
    """The mask for a forward whose queries are a left-padded batch's last `query_length` columns.

    A ready (B, 1, q, kv) mask where this function can build it, else `attention_mask` itself.
    From a 2-D mask, transformers reads the padding back to the host to decide whether it needs a
    mask at all (one sync per forward, which stalls an accelerator's launch queue); a 4-D mask is
    used as given. Built for `sdpa` (boolean) and `eager` (additive, `dtype`'s lowest value where
    masked). Other attention implementations, and sliding windows shorter than the batch, get the
    2-D mask. A query with no real column before it (a padding position) attends to every column,
    as transformers does for old torch versions: its output is never read, but must stay finite.
    """
    impl = attention_implementation(config)
    window = getattr(text_config(config), "sliding_window", None)
    kv = attention_mask.shape[1]
    if impl not in ("sdpa", "eager") or (window is not None and kv > window):
        return attention_mask
    cols = torch.arange(kv, device=attention_mask.device)
    causal = cols <= cols[kv - query_length :, None]
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    allowed = (allowed | ~allowed.any(-1, keepdim=True)).unsqueeze(1)
    if impl == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)
