"""Compatibility names: the plan's objective now lives in `training/objectives/plan.py`."""

from __future__ import annotations

from consistency_lens.models.patching import kl_at_p
from consistency_lens.training.objectives.plan import LossOutput, compute_losses, lm_loss

__all__ = ["LossOutput", "compute_losses", "kl_at_p", "lm_loss"]
