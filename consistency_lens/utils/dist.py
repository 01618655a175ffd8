"""Processes and devices: the torchrun process group, per-rank seeds, device resolution.

Shared by `dump` (one model per rank) and `train` (the engines in `training/distributed.py`).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

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


def setup(strategy: str, device: str) -> str:
    """Join the torchrun process group unless `strategy` is `none`; the device this rank uses."""
    if strategy == "none":
        return device
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise LensError(
            f"distributed.strategy={strategy} must be launched with torchrun (or scripts/slurm.sh), "
            f"which sets {', '.join(missing)}; use distributed.strategy=none for one process."
        )
    return join_process_group(device)


def join_process_group(device: str) -> str:
    """Pin this rank to its local GPU (if any) and join the group (nccl on CUDA, gloo on CPU);
    the device this rank uses."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return str(resolved)


def teardown(barrier: bool = True) -> None:
    """Barrier and destroy the process group, if one is running.

    `barrier` is False after an error, when another rank may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
