"""Schedules for tau, alpha and the learning-rate factor."""

from __future__ import annotations

import math

import pytest

from consistency_lens.config import ScheduleConfig
from consistency_lens.errors import LensError
from consistency_lens.training.schedules import schedule_value


def test_constant():
    s = ScheduleConfig(kind="constant", start=0.3, end=5.0)
    assert [schedule_value(s, i, 10) for i in (0, 5, 9)] == [0.3, 0.3, 0.3]


def test_linear_from_start_to_end():
    s = ScheduleConfig(kind="linear", start=2.0, end=0.5)
    assert schedule_value(s, 0, 11) == 2.0
    assert schedule_value(s, 5, 11) == pytest.approx(1.25)
    assert schedule_value(s, 10, 11) == pytest.approx(0.5)
    assert schedule_value(s, 50, 11) == pytest.approx(0.5)


def test_cosine():
    s = ScheduleConfig(kind="cosine", start=1.0, end=0.1)
    assert schedule_value(s, 0, 101) == pytest.approx(1.0)
    assert schedule_value(s, 50, 101) == pytest.approx(0.55)
    assert schedule_value(s, 100, 101) == pytest.approx(0.1)


def test_exponential_is_geometric():
    s = ScheduleConfig(kind="exponential", start=1.0, end=0.01)
    assert schedule_value(s, 0, 3) == pytest.approx(1.0)
    assert schedule_value(s, 1, 3) == pytest.approx(0.1)
    assert schedule_value(s, 2, 3) == pytest.approx(0.01)
    # Refused when the config is built; the runtime guard stays for unvalidated objects.
    with pytest.raises(ValueError, match="same sign"):
        ScheduleConfig(kind="exponential", start=1.0, end=0.0)
    through_zero = ScheduleConfig.model_construct(
        kind="exponential", start=1.0, end=0.0, warmup_steps=0, warmup_from=0.0
    )
    with pytest.raises(LensError, match="same sign"):
        schedule_value(through_zero, 1, 3)


def test_warmup_then_schedule():
    s = ScheduleConfig(kind="cosine", start=1.0, end=0.0, warmup_steps=10, warmup_from=0.0)
    assert schedule_value(s, 0, 110) == 0.0
    assert schedule_value(s, 5, 110) == pytest.approx(0.5)
    assert schedule_value(s, 10, 110) == pytest.approx(1.0)
    assert schedule_value(s, 109, 110) == pytest.approx(0.0, abs=1e-12)
    mid = schedule_value(s, 10 + 99 // 2, 110)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * (49 / 99))))


def test_end_none_means_start():
    s = ScheduleConfig(kind="linear", start=0.7)
    assert schedule_value(s, 3, 10) == pytest.approx(0.7)
