"""The resume rules: which checkpoint a run continues from, which settings must not have changed,
and how a checkpoint maps onto the engine now running (formats and world sizes).

DeepSpeed's own files resume only on the same number of ranks; any other checkpoint loads into
any engine, its data position rescaled to the new global batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from consistency_lens.config import LensConfig, dump_config, weight_settings
from consistency_lens.errors import LensError
from consistency_lens.training.checkpoint.dense import load_checkpoint
from consistency_lens.training.checkpoint.layout import EMA, list_checkpoints
from consistency_lens.training.checkpoint.manifest import is_sharded, latest_valid, read_config
from consistency_lens.training.checkpoint.rng import restore_or_reseed, restore_rng
from consistency_lens.training.checkpoint.safe_dcp import dcp_load
from consistency_lens.training.checkpoint.sharded import load_sharded_state
from consistency_lens.utils.dist import rank_world

if TYPE_CHECKING:
    from consistency_lens.training.distributed import Engine
    from consistency_lens.training.optim import Ema


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The newest valid checkpoint to resume from (None to start fresh), or refuse a fresh start
    over existing checkpoints."""
    existing = list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise LensError(
                f"'{run_dir}' already holds checkpoints; pass --resume to continue that run or "
                "choose another train.run_dir."
            )
        return None
    return latest_valid(run_dir)


def check_resume_config(cfg: LensConfig, path: Path) -> None:
    """Refuse to resume a checkpoint trained with another value of any weight-defining setting."""
    saved = weight_settings(read_config(path))
    for key, new in weight_settings(dump_config(cfg)).items():
        if saved[key] != new:
            raise LensError(
                f"Cannot resume from '{path}': it was trained with {key}={saved[key]!r} but the "
                f"config says {key}={new!r}; use the same config or a new train.run_dir."
            )


def restore_run(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """Load weights, optimizer, scheduler, EMA and RNG from a checkpoint; the train-state dict."""
    check_resume_config(cfg, path)
    if engine.own_format is not None:
        return _restore_own(engine, cfg, ema, path)
    if engine.sharded or is_sharded(path):
        # Either side sharded: map between world sizes and formats.
        return _restore_mapped(engine, cfg, ema, path)
    loaded = load_checkpoint(path)
    engine.lens.load_trainable_state_dict(loaded.trainable)
    engine.optimizer.load_state_dict(loaded.state["optimizer"])
    engine.scheduler.load_state_dict(loaded.state["scheduler"])
    if ema is not None:
        ema.load_state_dict(loaded.ema or engine.lens.trainable_parameters())
    restore_rng(loaded.state["rng"])
    return dict(loaded.state["train_state"])


def _restore_mapped(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """Any checkpoint (sharded or single-process) into a DCP-capable engine of any world size."""
    rank, world = rank_world()
    if is_sharded(path):
        state, rng = load_sharded_state(path, rank)
        target = engine.sharded_state(ema)
        dcp_load(target, path)
        engine.set_sharded_state(target)
    else:
        loaded = load_checkpoint(path)
        state, rng = loaded.state, loaded.state["rng"] if rank == 0 else None
        engine.load_full(loaded.trainable, loaded.state["optimizer"])
        if ema is not None and loaded.ema is not None:
            _copy_into(ema.shadow, loaded.ema)
    engine.scheduler.load_state_dict(state["scheduler"])
    restore_or_reseed(rng, cfg.seed, state["step"])
    return rescale_position(state, cfg.train.batch_size * world)


def _restore_own(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """A checkpoint in the engine's own format (DeepSpeed), written with the same world size."""
    rank, world = rank_world()
    if not (path / engine.own_format).is_dir():
        raise LensError(
            f"Checkpoint '{path}' was not written with distributed.strategy="
            f"{engine.own_format}; resume it with the strategy that wrote it."
        )
    state, rng = load_sharded_state(path, rank)
    if state.get("world_size") != world:
        raise LensError(
            f"Checkpoint '{path}' was written by {state.get('world_size')} DeepSpeed ranks; "
            f"resume it with {state.get('world_size')} ranks, not {world}."
        )
    engine.read_own(path)
    if ema is not None and (path / EMA).is_file():
        _copy_into(ema.shadow, load_file(str(path / EMA)))
    engine.scheduler.load_state_dict(state["scheduler"])
    restore_or_reseed(rng, cfg.seed, state["step"])
    return dict(state["train_state"])


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for key, value in target.items():
            if isinstance(value, DTensor):
                src = distribute_tensor(
                    source[key].to(value.dtype), value.device_mesh, value.placements
                )
                value.copy_(src)
            else:
                value.copy_(source[key])


def rescale_position(state: dict, global_batch: int) -> dict:
    """The saved train state with its data position in batches of `global_batch`."""
    # The data position counts global batches; keep the number of samples seen when the global
    # batch (batch_size x world) changed, rounding down to a whole batch.
    train_state = dict(state["train_state"])
    saved = int(state.get("global_batch", global_batch))
    train_state["batch_in_epoch"] = train_state["batch_in_epoch"] * saved // global_batch
    return train_state
