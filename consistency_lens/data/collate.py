"""Left-pad a batch so that every sample's position P is the last column."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from consistency_lens.models.inputs import left_pad, right_pad


@dataclass
class Batch:
    """A collated batch of activation samples; `P` of every row is column -1."""

    input_ids_A: torch.Tensor
    """(B, T) left-padded tokens 0..P of A's context."""
    attention_mask_A: torch.Tensor
    """(B, T) 1 on real tokens, 0 on padding."""
    A: torch.Tensor
    """(B, d) activations at block L, position P."""
    input_ids_A_prime: torch.Tensor
    """(B, T') left-padded context of A' (another sequence)."""
    attention_mask_A_prime: torch.Tensor
    """(B, T') mask of A' context."""
    A_prime: torch.Tensor
    """(B, d) activations A'."""
    input_ids_next: torch.Tensor | None = None
    """(B, N) right-padded corpus tokens after P (N = the dump's `next_tokens`), when the dump has them."""
    attention_mask_next: torch.Tensor | None = None
    """(B, N) 1 on real next tokens, 0 on padding (a sequence may end before N tokens)."""
    predicted_ids: torch.Tensor | None = None
    """(B, k) M's continuation after P stored by the dump, when the dataset reads it
    (`ActivationDataset.read_predictions`): `warm_start_predict`'s targets without running M."""

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def last_context(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The true last `k` context tokens ending at P and their mask (fewer, left-padded,
        where a context is shorter): what the eval's context rows and the ceiling read."""
        k = min(k, self.input_ids_A.shape[1])
        return self.input_ids_A[:, -k:], self.attention_mask_A[:, -k:]

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to `device` (asynchronously from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (what DataLoader's `pin_memory` calls)."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.A.shape[0]


class CollateFn:
    """Collate dataset items (mappings) into a left-padded `Batch`."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> Batch:
        ids_a, mask_a = left_pad([it["input_ids_A"] for it in items], self.pad_id)
        ids_p, mask_p = left_pad([it["input_ids_A_prime"] for it in items], self.pad_id)
        ids_n = mask_n = None
        if all("input_ids_next" in it for it in items):
            # Right-padded: token t of row r is the t-th token after P, for teacher forcing.
            ids_n, mask_n = right_pad([it["input_ids_next"] for it in items], self.pad_id)
        predicted = None
        if all("predicted_ids" in it for it in items):
            predicted = torch.stack([it["predicted_ids"] for it in items])
        return Batch(
            input_ids_A=ids_a,
            attention_mask_A=mask_a,
            A=torch.stack([it["A"] for it in items]),
            input_ids_A_prime=ids_p,
            attention_mask_A_prime=mask_p,
            A_prime=torch.stack([it["A_prime"] for it in items]),
            input_ids_next=ids_n,
            attention_mask_next=mask_n,
            predicted_ids=predicted,
        )
