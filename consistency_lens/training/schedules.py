"""Scalar schedules for tau, alpha and the learning-rate factor."""

from __future__ import annotations

import math

from consistency_lens.config import ScheduleConfig
from consistency_lens.errors import LensError


def schedule_value(s: ScheduleConfig, step: int, total_steps: int) -> float:
    """Value of schedule `s` at optimizer step `step` (0-based) of a `total_steps` run."""
    if s.warmup_steps and step < s.warmup_steps:
        return s.warmup_from + (s.start - s.warmup_from) * step / s.warmup_steps
    end = s.start if s.end is None else s.end
    if s.kind == "constant":
        return s.start
    span = max(total_steps - 1 - s.warmup_steps, 1)
    frac = min(max((step - s.warmup_steps) / span, 0.0), 1.0)
    if s.kind == "linear":
        return s.start + (end - s.start) * frac
    if s.kind == "cosine":
        return end + (s.start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if s.start * end <= 0:
        raise LensError(
            f"An exponential schedule needs start and end of the same sign and non-zero "
            f"(got start={s.start}, end={end}); use kind linear or cosine instead."
        )
    return s.start * (end / s.start) ** frac
