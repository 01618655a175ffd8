"""Padded token batches as the models read them: left padding puts every row's P last."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from consistency_lens.models.attention import attention_implementation, text_config


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def no_logits() -> torch.Tensor:
    """A `logits_to_keep` that keeps no position, for a pass run only for its kv cache."""
    # On the CPU: it indexes hidden states on any device (the head may sit on another GPU than
    # the embedding under device_map), and an empty index copies nothing.
    return torch.empty(0, dtype=torch.long)


def tile_cache(cache: DynamicCache, repeats: int, upto: int | None = None) -> DynamicCache:
    """A new cache holding `repeats` stacked copies of `cache` along the batch (of its first
    `upto` positions only, when given); a batch of one is broadcast, not copied.

    Cache layers grow by concatenation (never in place), so sharing the prefix tensors between the
    original and the new cache is safe: a pass over the new cache leaves the original untouched.
    """
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            keys, values = layer.keys[:, :, :upto], layer.values[:, :, :upto]
            if keys.shape[0] == 1:
                twin.keys = keys.expand(repeats, -1, -1, -1)
                twin.values = values.expand(repeats, -1, -1, -1)
            else:
                twin.keys = keys.repeat(repeats, 1, 1, 1)
                twin.values = values.repeat(repeats, 1, 1, 1)
        new.layers.append(twin)
    return new


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
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return _as_mask(allowed, impl, dtype)


def _as_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, q, kv) "may attend" as the (B, 1, q, kv) mask `impl` reads: boolean for
    `sdpa`, additive (`dtype`'s lowest value where masked) for `eager`."""
    allowed = allowed.unsqueeze(1)
    if impl == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


PACK_TOKENS = 512
"""The most tokens `pack` lays in one packed row (one longer row gets a packed row of its own):
a packed row's attention spans all of it, masked, so its cost grows with the square of this."""

PACK_DEVICES = frozenset({"cpu"})
"""Device types where M's passes over a padded batch are packed (`can_pack`). On a CPU a padded
token costs as much as a real one and reading the lengths back is free; on an accelerator the
read is a host sync per step, and the padded passes are the ones its tests ran."""


def can_pack(config: object, device: torch.device, attention_mask: torch.Tensor) -> bool:
    """Whether `Packed` passes of this left-padded batch run exactly on this model: on a
    `PACK_DEVICES` device, `sdpa` or `eager` attention without a sliding window, and with some
    padding to save and some tokens to pack (both read on the host, which is free there)."""
    impl = attention_implementation(config)
    return (
        device.type in PACK_DEVICES
        and impl in ("sdpa", "eager")
        and getattr(text_config(config), "sliding_window", None) is None
        and not bool(attention_mask.all())
        and bool(attention_mask.any())
    )


@dataclass
class Packed:
    """A left-padded batch's rows laid end to end, unpadded, in a few packed rows, so M computes
    no padding: each row attends to its own tokens alone, at its own positions. A batch of
    contexts ending at a uniform P is ~40% padding, all of it computed by a padded pass.

    Later tokens of every row (`step`) go in one more column per row at the end of its packed
    row, over the kv cache of the columns before: a row's tokens stay in its `segments`.
    """

    input_ids: torch.Tensor
    """(R, W) the rows' real tokens, packed in batch order, right-padded."""
    position_ids: torch.Tensor
    """(R, W) each token's position in its own row."""
    segments: torch.Tensor
    """(R, columns) the batch row of each column so far; a padding column gets -1 - its index,
    which no other column has, so it attends to itself alone (its output is never read)."""
    pack: torch.Tensor
    """(B,) the packed row of each batch row."""
    slot: torch.Tensor
    """(B,) each batch row's place among its packed row's rows (its column in a `step`)."""
    last: torch.Tensor
    """(B,) the column of each batch row's last token."""
    lengths: torch.Tensor
    """(B,) each batch row's number of tokens so far."""
    impl: str
    dtype: torch.dtype

    @property
    def slots(self) -> int:
        """Columns a `step` adds to each packed row: the most rows any packed row holds."""
        return int(self.slot.max()) + 1

    def first(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The forward inputs of the pass over `input_ids` (its mask same row and causal), the
        columns to keep logits at (`logits_to_keep`), and each batch row's index into those."""
        cols = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        same = self.segments.unsqueeze(2) == self.segments.unsqueeze(1)
        keep, index = torch.unique(self.last, return_inverse=True)
        mask = _as_mask(same & (cols <= cols[:, None]), self.impl, self.dtype)
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": mask,
        }
        return inputs, keep, index

    def step(self, tokens: torch.Tensor, repeats: int = 1) -> dict[str, torch.Tensor]:
        """The forward inputs of one more token per batch row, `tokens` (B,), appended after the
        columns so far (whose kv cache the pass reads), `repeats` times side by side (each copy
        sees its row's earlier columns and itself, not the other copies); its logits are at
        `query_index(repeats)`."""
        rows, slots = len(self.input_ids), self.slots
        device = self.input_ids.device
        start = self.segments.shape[1]
        cols = start + torch.arange(repeats * slots, device=device)
        segments = (-1 - cols).repeat(rows, 1)
        ids = torch.zeros((rows, repeats * slots), dtype=torch.long, device=device)
        positions = torch.zeros_like(ids)
        at = self.query_index(repeats)
        segments[at] = torch.arange(len(tokens), device=device).repeat(repeats)
        ids[at] = tokens.repeat(repeats)
        positions[at] = self.lengths.repeat(repeats)
        self.segments = torch.cat([self.segments, segments], 1)
        self.lengths = self.lengths + 1
        keys = torch.arange(self.segments.shape[1], device=device)
        same = segments.unsqueeze(2) == self.segments.unsqueeze(1)
        seen = (keys < start) | (keys == cols[:, None])
        mask = _as_mask(same & seen, self.impl, self.dtype)
        return {"input_ids": ids, "position_ids": positions, "attention_mask": mask}

    def query_index(self, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed row, column) within a `step`'s columns of each of its `repeats` x B queries,
        copy by copy, each in batch order."""
        copies = torch.arange(repeats, device=self.slot.device).unsqueeze(1)
        return self.pack.repeat(repeats), (copies * self.slots + self.slot).flatten()


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, config: object, dtype: torch.dtype
) -> Packed:
    """`Packed` rows of a left-padded batch, a new packed row whenever the next batch row would
    take one past `PACK_TOKENS` tokens."""
    lengths = attention_mask.sum(1).tolist()
    groups: list[list[int]] = [[]]
    totals = [0]
    for row, n in enumerate(lengths):
        if groups[-1] and totals[-1] + n > PACK_TOKENS:
            groups.append([])
            totals.append(0)
        groups[-1].append(row)
        totals[-1] += n
    width = max(totals)
    device = input_ids.device
    ids = torch.zeros((len(groups), width), dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    segments = -1 - torch.arange(width, device=device).repeat(len(groups), 1)
    where = torch.zeros((len(lengths), 3), dtype=torch.long)
    for r, group in enumerate(groups):
        col = 0
        for s, row in enumerate(group):
            n = lengths[row]
            ids[r, col : col + n] = input_ids[row, input_ids.shape[1] - n :]
            positions[r, col : col + n] = torch.arange(n, device=device)
            segments[r, col : col + n] = row
            where[row] = torch.tensor([r, s, col + n - 1])
            col += n
    where = where.to(device)
    return Packed(
        input_ids=ids,
        position_ids=positions,
        segments=segments,
        pack=where[:, 0],
        slot=where[:, 1],
        last=where[:, 2],
        lengths=torch.tensor(lengths, device=device),
        impl=attention_implementation(config),
        dtype=dtype,
    )
