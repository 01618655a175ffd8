"""Near-identity projections with matched norms, and the norm statistics that calibrate them."""

from __future__ import annotations

import torch
from torch import nn

from consistency_lens.models.adapter import ModelParts
from consistency_lens.models.hooks import run_until


def near_identity(d_in: int, d_out: int, scale: float) -> nn.Linear:
    """A float32 `nn.Linear` that is `scale` times the identity (or a semi-orthogonal map)."""
    proj = nn.Linear(d_in, d_out, dtype=torch.float32)
    with torch.no_grad():
        if d_in == d_out:
            proj.weight.copy_(torch.eye(d_in))
        else:
            # A semi-orthogonal map keeps norms when widening and is the closest thing to I otherwise.
            nn.init.orthogonal_(proj.weight)
        proj.weight.mul_(scale)
        proj.bias.zero_()
    return proj


def embedding_norm(parts: ModelParts) -> float:
    """Median norm of the rows the model feeds its first block (embedding scale included)."""
    rows = parts.embed.weight.detach().float() * parts.embed_scale
    return float(rows.norm(dim=-1).median())


@torch.no_grad()
def activation_norm(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> float:
    """Median norm of `block`'s output over positions 1.. of `ids` (1, T).

    Position 0 is skipped because the first token is often an attention sink with a huge norm.
    """
    hidden = run_until(model, block, input_ids=ids)[0].float()
    if hidden.shape[0] > 1:
        hidden = hidden[1:]
    return float(hidden.norm(dim=-1).median())
