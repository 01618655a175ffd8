"""The single-process format: the trainable weights (never the frozen base) and the EMA as
safetensors, beside the shared `state.pt`, `config.json` and manifest."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from consistency_lens.errors import LensError
from consistency_lens.training.checkpoint.layout import (
    EMA,
    TMP_PREFIX,
    TRAINABLE,
    checkpoints_dir,
    move_into_place,
    prune_checkpoints,
)
from consistency_lens.training.checkpoint.manifest import seal, verified_state
from consistency_lens.utils.io import is_out_of_space, out_of_space_error


@dataclass
class Checkpoint:
    """A verified checkpoint loaded into memory."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    state: dict
    ema: dict[str, torch.Tensor] | None = None


def _tensors_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a CPU clone is always acceptable.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _write_files(
    tmp: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict,
    config: dict,
    ema: dict[str, torch.Tensor] | None,
) -> None:
    save_file(_tensors_for_save(trainable), str(tmp / TRAINABLE))
    if ema is not None:
        save_file(_tensors_for_save(ema), str(tmp / EMA))
    seal(tmp, step, state, config)


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict,
    config: dict,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write `step_<step>` atomically, then keep only the newest `keep` checkpoints up to `step`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}step_{step}-", dir=root))
    final = root / f"step_{step}"
    try:
        _write_files(tmp, step, trainable, state, config, ema)
        move_into_place(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(err):
            raise out_of_space_error(final, "rerun with --resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, step, keep)
    return final


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LensError(f"Checkpoint file '{path}' is not valid safetensors ({err}).") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and load a checkpoint directory."""
    path = Path(path)
    state = verified_state(path)
    ema_path = path / EMA
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        trainable=_load_tensors(path / TRAINABLE),
        state=state,
        ema=_load_tensors(ema_path) if ema_path.is_file() else None,
    )
