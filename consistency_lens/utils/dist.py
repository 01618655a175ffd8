"""Processes and devices: the torchrun process group, per-rank seeds, device resolution.

Shared by `dump` (one model per rank) and `train` (the engines in `training/distributed.py`).
"""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LensError(f"device='{spec}' is not a device; use auto, cpu or cuda[:N].") from None
    if device.type not in ("cpu", "cuda"):
        raise LensError(f"device='{spec}' is not a device; use auto, cpu or cuda[:N].")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LensError(f"device='{spec}' asks for CUDA but none is available; use device=cpu.")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise LensError(
                f"device='{spec}' is out of range: this machine has {count} CUDA device(s); "
                f"use cuda:0..cuda:{count - 1}."
            )
    return device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int) -> int:
    """This rank's seed (`seed + rank`): rank 0 keeps `seed`, so one process matches strategy none."""
    return seed + rank_world()[0]


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_ranks(seed: int) -> None:
    """Give each rank its own random stream (Gumbel noise); one process keeps its stream untouched."""
    if rank_world()[1] > 1:
        seed_all(rank_seed(seed))


def setup(cfg: LensConfig) -> LensConfig:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); the config with this rank's device."""
    strategy = cfg.distributed.strategy
    if strategy == "none":
        return cfg
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise LensError(
            f"distributed.strategy={strategy} must be launched with torchrun (or scripts/slurm.sh), "
            f"which sets {', '.join(missing)}; use distributed.strategy=none for one process."
        )
    return join_process_group(cfg)


def join_process_group(cfg: LensConfig) -> LensConfig:
    """Pin this rank to its local GPU (if any), join the group; the config with that device."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return cfg.model_copy(update={"device": str(device)})


def teardown(run: object | None, barrier: bool = True) -> None:
    """Drop the run's models, then barrier and destroy the process group.

    A DDP module that outlives its process group can abort the interpreter at exit. `barrier`
    is False after an error, when another rank may never reach the barrier.
    """
    for name in ("model", "engine", "lens", "optimizer", "scheduler", "ema"):
        if run is not None and hasattr(run, name):
            setattr(run, name, None)
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
