"""torchrun entry for the distributed tests: `consistency-lens train` with noiseless Gumbel-Softmax.

Each rank draws its own Gumbel noise (per-rank seeds), so only without noise can a multi-process
step be compared with one process on the same global batch; the straight-through estimator stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from consistency_lens.cli import main


def noiseless_gumbel_softmax(
    logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, **_: object
) -> torch.Tensor:
    """`F.gumbel_softmax` with the noise left out: hard argmax forward, softmax(logits/tau) backward."""
    soft = F.softmax(logits / tau, dim=dim)
    if not hard:
        return soft
    onehot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return onehot - soft.detach() + soft


if __name__ == "__main__":
    torch.set_num_threads(1)
    F.gumbel_softmax = noiseless_gumbel_softmax
    main()
