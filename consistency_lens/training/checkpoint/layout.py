"""Where a run's checkpoints live: the file names, the `step_<N>` directories, and how a finished
directory is renamed into place and old ones are pruned."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from consistency_lens.utils.io import fsync_path

FORMAT_VERSION = 1
"""Bumped whenever the meaning of a checkpoint's files changes."""

TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
MANIFEST = "manifest.json"
SHARDED = "sharded"
"""Manifest `kind` of a checkpoint written collectively by several ranks."""

TMP_PREFIX = ".tmp-"
"""Prefix of a directory still being written (or left by an interrupted write)."""

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    """The directory holding a run's `step_<N>` checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """All `step_<N>` directories of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def rng_file(rank: int) -> str:
    """The file of a sharded checkpoint holding rank `rank`'s RNG states."""
    return f"rng_{rank}.pt"


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final`, replacing any directory already there."""
    # A directory rename cannot replace a non-empty directory, so an existing one (a stale or
    # corrupt checkpoint of the same step) is moved aside first and deleted after the swap.
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(run_dir: Path, current_step: int, keep: int) -> None:
    """Delete leftovers of interrupted writes, checkpoints beyond `current_step`, and old ones."""
    root = checkpoints_dir(run_dir)
    for child in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(child, ignore_errors=True)
    # Checkpoints newer than the one just written belong to an abandoned trajectory (a resume
    # fell back past them because they were corrupt); keeping them would shadow the new ones.
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts:
        if step > current_step:
            shutil.rmtree(path, ignore_errors=True)
    current = [(s, p) for s, p in ckpts if s <= current_step]
    for _, path in current[: max(0, len(current) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
