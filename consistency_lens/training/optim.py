"""AdamW over the lens's parameter groups, the learning-rate schedule, and an optional EMA."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from consistency_lens.config import TrainConfig
from consistency_lens.errors import LensError
from consistency_lens.training.schedules import schedule_value


def _trainable_groups(groups: list[dict]) -> list[dict]:
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            out.append({**group, "params": params})
    if not out:
        raise LensError("The lens has no trainable parameters; check train.mode.")
    return out


def build_optimizer(
    param_groups: list[dict], cfg: TrainConfig
) -> tuple[torch.optim.AdamW, LambdaLR]:
    """Fused AdamW over `lens.param_groups()` and a LambdaLR driven by `lr_schedule`."""
    groups = _trainable_groups(param_groups)
    # Fused on every device (CPU too): one kernel per group instead of ~10 per parameter,
    # and the step counts stay on the device (the per-parameter loop reads each one back).
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # LambdaLR multiplies each group's own base lr (projections vs blocks) by the shared factor.
    scheduler = LambdaLR(optimizer, lambda step: schedule_value(cfg.lr_schedule, step, cfg.steps))
    return optimizer, scheduler


class Ema:
    """Exponential moving average of a state dict of trainable tensors (kept in fp32)."""

    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        """Move the average towards `state`."""
        for key, value in state.items():
            self.shadow[key].lerp_(value.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the averaged tensors (on resume); copies, so live weights are never aliased."""
        self.shadow = {
            k: v.detach().to(self.shadow[k].device, torch.float32, copy=True)
            for k, v in state.items()
        }
