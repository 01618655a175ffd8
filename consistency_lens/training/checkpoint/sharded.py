"""The multi-process format (ddp/fsdp/deepspeed): the engine's own files, `state.pt` without
weights and one `rng_<rank>.pt` per rank, written collectively and sealed by rank 0."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from consistency_lens.errors import LensError
from consistency_lens.training.checkpoint.layout import (
    SHARDED,
    TMP_PREFIX,
    checkpoints_dir,
    move_into_place,
    prune_checkpoints,
    rng_file,
)
from consistency_lens.training.checkpoint.manifest import load_state, seal, verified_state
from consistency_lens.utils.io import is_out_of_space, out_of_space_error


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    write: Callable[[Path], None],
    state: dict,
    rng: dict,
    config: dict,
    keep: int,
    rank: int,
    barrier: Callable[[], None],
    all_ok: Callable[[bool], bool] = lambda ok: ok,
) -> Path:
    """Collective save: every rank runs `write(tmp)` and stores its RNG; rank 0 seals and renames.

    The temporary directory has a fixed name so that all ranks agree on it without a broadcast.
    `all_ok(ok)` is a collective (True when every rank passed True): after the writes and after
    the seal every rank learns whether any rank failed, so none waits forever at a barrier; on
    a failure rank 0 removes the temporary directory and every rank raises.
    """
    root = checkpoints_dir(run_dir)
    tmp = root / f"{TMP_PREFIX}step_{step}-sharded"
    final = root / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    def write_own() -> None:
        write(tmp)
        with open(tmp / rng_file(rank), "wb") as handle:
            torch.save(rng, handle)

    def seal_and_place() -> None:
        if rank == 0:
            seal(tmp, step, state, config, SHARDED)
            move_into_place(tmp, final)
            prune_checkpoints(run_dir, step, keep)

    for part in (write_own, seal_and_place):
        error: Exception | None = None
        try:
            part()
        except Exception as err:
            error = err
        if not all_ok(error is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise LensError(
                    f"Checkpoint '{final}' could not be written: another rank failed while "
                    "writing its part (see that rank's error); rerun with --resume."
                )
            if is_out_of_space(error):
                raise out_of_space_error(final, "rerun with --resume") from None
            raise error
    return final


def load_sharded_state(path: Path, rank: int) -> tuple[dict, dict | None]:
    """Verify a sharded checkpoint; its `state.pt` and this rank's RNG (None if it had no such rank)."""
    path = Path(path)
    state = verified_state(path)
    rng_path = path / rng_file(rank)
    return state, load_state(rng_path) if rng_path.is_file() else None
