"""The trainer's save: a run's state at a step, in the format its engine calls for.

The engines only hand over state: the optimizer's and scheduler's `state_dict`, `sharded_state`
(a torch.distributed.checkpoint dict) and DeepSpeed's own files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from consistency_lens.config import LensConfig, dump_config
from consistency_lens.training.checkpoint.dense import save_checkpoint
from consistency_lens.training.checkpoint.layout import EMA
from consistency_lens.training.checkpoint.rng import capture_rng
from consistency_lens.training.checkpoint.sharded import save_sharded_checkpoint
from consistency_lens.utils.dist import barrier, rank_world

if TYPE_CHECKING:
    from consistency_lens.training.distributed import Engine
    from consistency_lens.training.optim import Ema


def save_run(
    engine: Engine, cfg: LensConfig, step: int, train_state: dict, ema: Ema | None
) -> Path:
    """Checkpoint a run at `step` (collectively under ddp/fsdp/deepspeed, where all ranks call it)."""
    run_dir, keep, config = cfg.train.run_dir, cfg.train.keep_checkpoints, dump_config(cfg)
    rank, world = rank_world()
    # What `batch_in_epoch` counts in, so a resume with another global batch can rescale it.
    global_batch = cfg.train.batch_size * world
    if not engine.sharded:
        state = {
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.scheduler.state_dict(),
            "rng": capture_rng(),
            "train_state": train_state,
            "global_batch": global_batch,
        }
        return save_checkpoint(
            run_dir,
            step,
            engine.lens.trainable_state_dict(),
            state,
            config,
            ema=ema.state_dict() if ema is not None else None,
            keep=keep,
        )

    def write(tmp: Path) -> None:
        if engine.own_format is None:
            import torch.distributed.checkpoint as dcp

            dcp.save(engine.sharded_state(ema), checkpoint_id=tmp)
            return
        engine.write_own(tmp)
        if ema is not None and rank == 0:
            save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, tmp / EMA)

    state = {
        "scheduler": engine.scheduler.state_dict(),
        "train_state": train_state,
        "global_batch": global_batch,
        "world_size": world,
    }
    return save_sharded_checkpoint(
        run_dir, step, write, state, capture_rng(), config, keep, rank, barrier, engine.all_ok
    )
