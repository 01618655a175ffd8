"""AdamW groups keep their own learning rates under the shared schedule factor; EMA math."""

from __future__ import annotations

import pytest
import torch

from consistency_lens.config import ScheduleConfig, TrainConfig
from consistency_lens.errors import LensError
from consistency_lens.training.optim import Ema, build_optimizer


def test_groups_follow_schedule_factor():
    head, block, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    frozen.requires_grad_(False)
    cfg = TrainConfig(
        steps=11, lr_schedule=ScheduleConfig(kind="linear", start=1.0, end=0.0, warmup_steps=0)
    )
    groups = [
        {"name": "proj", "params": [head], "lr": 1e-2},
        {"params": [block, frozen], "lr": 1e-4},
    ]
    opt, sched = build_optimizer(groups, cfg)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-4]
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3, 5e-5])


def test_no_trainable_parameters_is_a_clear_error():
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(LensError, match="no trainable parameters"):
        build_optimizer([{"params": [frozen]}], TrainConfig())


def test_ema_update():
    ema = Ema({"w": torch.zeros(2)}, decay=0.75)
    ema.update({"w": torch.ones(2)})
    assert torch.allclose(ema.state_dict()["w"], torch.full((2,), 0.25))


def test_ema_loaded_from_live_weights_does_not_alias_them():
    # A resume from a checkpoint without an average loads the live weights into the EMA; the
    # average must be a copy, or every optimizer step would move it with the weights.
    w = torch.nn.Parameter(torch.zeros(2))
    ema = Ema({"w": w}, decay=0.75)
    ema.load_state_dict({"w": w})
    with torch.no_grad():
        w.add_(4.0)
    ema.update({"w": w})
    assert torch.equal(ema.state_dict()["w"], torch.tensor([1.0, 1.0]))  # 0.75·0 + 0.25·4
    assert torch.equal(w.detach(), torch.tensor([4.0, 4.0]))
