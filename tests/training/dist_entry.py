"""torchrun entry for the distributed tests: `consistency-lens train` with Gumbel noise that is
the same in one process and on 2 ranks, and a well-conditioned AdamW.

Each rank draws its own Gumbel noise (per-rank seeds) by design, so a multi-process step can be
compared with one process on the same global batch only under noise that does not depend on the
rank: here noise fixed per row parity (`parity_noise`), which still leaves GRPO's samples of one
activation different from each other (with none they would all be D's greedy text, and GRPO
would train D on nothing); the straight-through estimator stays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from consistency_lens.cli import main
from consistency_lens.models import decoder
from consistency_lens.training import distributed

# AdamW's first update of a weight is lr * g / (|g| + eps), whose sensitivity to g is up to
# lr / eps. With the default eps=1e-8 and lr=1e-2 that is 1e6: a gradient entry that nearly
# cancels (|g| ~ 1e-9) turns the ~1e-11 float reduction-order difference between one batch of 4
# and two all-reduced batches of 2 into a 1e-5 weight difference. eps=1e-5 bounds the gain at
# 1e3, so equal gradients (to fp32 rounding) give equal weights within the tests' tolerance,
# and the weights still depend on the gradient's scale (a sum-instead-of-mean shows up).
ADAM_EPS = 1e-5


def parity_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel noise fixed per (row parity, token): the same rows of a global batch get the same
    noise in one process and on 2 ranks (each rank takes a contiguous slice of an even size), and
    GRPO's samples of one activation (rows i*k + j, k even) alternate between the two rows."""
    rows = torch.Generator().manual_seed(0)
    table = torch.rand(2, like.shape[-1], generator=rows).log_().neg_().log_().neg_()
    flat = like.reshape(-1, like.shape[-1])
    noise = table[torch.arange(flat.shape[0]) % 2]
    return noise.reshape(like.shape).to(like.device)


def coarse_eps(build: Callable[..., tuple]) -> Callable[..., tuple]:
    """`build_optimizer` whose AdamW uses `ADAM_EPS` (see above) in every parameter group."""

    def build_with_eps(*args: object, **kwargs: object) -> tuple:
        optimizer, scheduler = build(*args, **kwargs)
        for group in optimizer.param_groups:
            group["eps"] = ADAM_EPS
        return optimizer, scheduler

    return build_with_eps


if __name__ == "__main__":
    torch.set_num_threads(1)
    decoder.gumbel_noise = parity_noise
    distributed.build_optimizer = coarse_eps(distributed.build_optimizer)
    main()
